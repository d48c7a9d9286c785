"""Process settings for the CPU path (nfed/common/cpu_runtime.py): the OpenBLAS core choice and glibc's thresholds."""
from __future__ import annotations

import os
import subprocess
import sys

from nfed.common import cpu_runtime

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"})


def test_skylakex_kernels_only_for_amd_with_avx512():
    assert cpu_runtime.openblas_core("AuthenticAMD", AVX512) == "SkylakeX"
    assert cpu_runtime.openblas_core("AuthenticAMD", AVX512 - {"avx512bw"}) is None  # Zen 3 and older
    assert cpu_runtime.openblas_core("GenuineIntel", AVX512) is None  # OpenBLAS detects Intel itself
    assert cpu_runtime.openblas_core("", frozenset()) is None


def test_cpu_description_reads_vendor_and_flags(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu avx2 avx512f\n\nprocessor\t: 1\n")
    assert cpu_runtime.cpu_description(str(info)) == ("AuthenticAMD", frozenset({"fpu", "avx2", "avx512f"}))
    assert cpu_runtime.cpu_description(str(tmp_path / "missing")) == ("", frozenset())


def _environment_of_a_fresh_import(env: dict) -> str:
    code = "import os, nfed, numpy; print(os.environ.get('OPENBLAS_CORETYPE', '-'))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_a_users_choice_wins_and_numpy_loaded_first_is_left_alone():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    expected = cpu_runtime.openblas_core(*cpu_runtime.cpu_description()) or "-"
    assert _environment_of_a_fresh_import(env) == expected
    assert _environment_of_a_fresh_import({**env, "OPENBLAS_CORETYPE": "Haswell"}) == "Haswell"
    code = "import os, numpy, nfed; print(os.environ.get('OPENBLAS_CORETYPE', '-'))"
    late = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert late.stdout.strip() == "-"


def test_keeping_freed_memory_can_be_switched_off(monkeypatch):
    monkeypatch.setenv(cpu_runtime.KEEP_MEMORY_ENV, "0")
    assert cpu_runtime.keep_freed_memory() is False
    monkeypatch.delenv(cpu_runtime.KEEP_MEMORY_ENV)
    assert cpu_runtime.keep_freed_memory() is sys.platform.startswith("linux")
