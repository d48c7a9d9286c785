"""Every CUDA source in kernels/ compiles with nvcc (sm_80 and sm_90), no GPU needed.

Also checks, from the compiled PTX, that every kernel nfed.cuda_ops launches exists and takes exactly the
argument types cuda_ops converts to (pointer/int64 -> .u64, int32 -> .u32, float -> .f32, double -> .f64),
so a signature drift between a .cu file and its Python caller fails here instead of corrupting a launch
on a GPU. Skipped only where nvcc is absent. Output goes to a temporary folder (nothing cached in the repo).
"""
from __future__ import annotations

import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from nfed import cuda_ops
from nfed.resources import kernels_dir

ARCHES = ("sm_80", "sm_90")
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


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[tuple[str, str], subprocess.CompletedProcess]:
    """(source name, arch) -> finished nvcc run; all runs in parallel (two at a time)."""
    nvcc = _nvcc()
    out_dir = tmp_path_factory.mktemp("ptx")

    def build(job):
        source, arch = job
        ptx = out_dir / f"{source.stem}.{arch}.ptx"
        run = subprocess.run([nvcc, "-ptx", f"-arch={arch}", "-std=c++17", "-o", str(ptx), str(source)],
                             capture_output=True, text=True, timeout=300)
        run.ptx_path = ptx
        return (source.name, arch), run

    jobs = [(s, a) for s in _sources() for a in ARCHES]
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(build, jobs))


def test_kernel_sources_exist():
    names = {p.name for p in _sources()}
    assert {source for source, _ in cuda_ops.KERNELS.values()} <= names


@pytest.mark.parametrize("arch", ARCHES)
def test_every_kernel_source_compiles(compiled, arch):
    failures = {name: run.stderr.strip() for (name, a), run in compiled.items() if a == arch and run.returncode}
    assert not failures, failures


def test_launched_kernels_match_their_ptx_signatures(compiled):
    entries: dict[str, list[str]] = {}
    for (name, arch), run in compiled.items():
        if arch != ARCHES[0] or run.returncode:
            continue
        for kernel, params in ENTRY.findall(run.ptx_path.read_text()):
            entries[kernel] = PARAM.findall(params)
    problems = []
    for kernel, (source, kinds) in cuda_ops.KERNELS.items():
        if kernel not in entries:
            problems.append(f"{kernel}: no such entry in {source}")
            continue
        expected = [PTX_TYPE_OF_KIND[k] for k in kinds]
        actual = [t.replace("s", "u", 1) if t in ("s32", "s64") else t for t in entries[kernel]]
        if expected != actual:
            problems.append(f"{kernel}: cuda_ops passes {expected}, PTX takes {actual}")
    assert not problems, problems
