"""Every CUDA source in kernels/ compiles with nvcc (sm_80; sm_90 in the slow suite), no GPU needed.

Also checks, from the compiled PTX, that every kernel nfed.gpu launches (nfed.gpu.kernels.KERNELS) exists and takes
exactly the argument types nfed.gpu.kernels.launch converts to (pointer/int64 -> .u64, int32 -> .u32, float -> .f32,
double -> .f64), so a signature drift between a .cu file and its Python caller fails here instead of corrupting a launch
on a GPU. Skipped only where nvcc is absent. Output goes to a temporary folder (nothing cached in the repo).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nfed.common.resources import kernels_dir
from nfed.gpu import kernels as gpu_kernels

PTX_TYPE_OF_KIND = {"p": "u64", "l": "u64", "i": "u32", "f": "f32", "d": "f64"}
ENTRY = re.compile(r"\.entry\s+(\w+)\s*\((.*?)\)", re.S)
PARAM = re.compile(r"\.param\s+\.(\w+)\s+\w+")


def _nvcc() -> str:
    path = shutil.which("nvcc")
    if path is None:
        pytest.skip("nvcc is not installed on this machine")
    return path


def _sources() -> list[Path]:
    return sorted(kernels_dir().glob("*.cu"))


def _compile_all(arch: str, out_dir: Path) -> dict[str, subprocess.CompletedProcess]:
    """source name -> finished `nvcc -ptx` run for one architecture, two compilations at a time."""
    nvcc = _nvcc()

    def build(source: Path):
        ptx = out_dir / f"{source.stem}.{arch}.ptx"
        run = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-std=c++17", "-o", str(ptx), str(source)],
                             capture_output=True, text=True, timeout=300)
        run.ptx_path = ptx
        return source.name, run

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build, _sources()))


@pytest.fixture(scope="module")
def sm80(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    return _compile_all("sm_80", tmp_path_factory.mktemp("ptx_sm80"))


def test_kernel_sources_exist():
    names = {p.name for p in _sources()}
    assert {source for source, _ in gpu_kernels.KERNELS.values()} <= names


def _failures(runs) -> dict[str, str]:
    return {name: run.stderr.strip() for name, run in runs.items() if run.returncode}


def test_every_kernel_source_compiles_for_sm80(sm80):
    assert not _failures(sm80)


@pytest.mark.slow
def test_every_kernel_source_compiles_for_sm90(tmp_path):
    assert not _failures(_compile_all("sm_90", tmp_path))


def test_launched_kernels_match_their_ptx_signatures(sm80):
    entries: dict[str, list[str]] = {}
    for run in sm80.values():
        if run.returncode:
            continue
        for kernel, params in ENTRY.findall(run.ptx_path.read_text()):
            entries[kernel] = PARAM.findall(params)
    problems = []
    for kernel, (source, kinds) in gpu_kernels.KERNELS.items():
        if kernel not in entries:
            problems.append(f"{kernel}: no such entry in {source}")
            continue
        expected = [PTX_TYPE_OF_KIND[k] for k in kinds]
        actual = [t.replace("s", "u", 1) if t in ("s32", "s64") else t for t in entries[kernel]]
        if expected != actual:
            problems.append(f"{kernel}: nfed passes {expected}, PTX takes {actual}")
    assert not problems, problems
