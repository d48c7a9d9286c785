"""A benchmark side in a fresh Python process: its answer is one JSON line on stdout.

Each side gets its own interpreter so it reports its own peak resident memory (ru_maxrss) and pays for
neither the other side's imports nor the parent's data generation.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from typing import Callable

from nfed.common.errors import NfedError


def json_worker(code: str, args: list[str], label: str, *, env: dict | None = None, echo_stderr: bool = False) -> dict:
    """Run `code` in a fresh interpreter with `args`; its last stdout line that starts with "{" is its answer.
    A crash gives NfedError with the last stderr line; an answer {"error": ...} gives NfedError with it."""
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env)
    if proc.stderr and echo_stderr:
        sys.stderr.write(proc.stderr)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise NfedError(f"{label} failed: {tail}")
    payload = json.loads(lines[-1])
    if "error" in payload:
        raise NfedError(payload["error"])
    return payload


def answer(measure: Callable[[], dict]) -> None:
    """The worker's side of json_worker: print measure()'s dict, or {"error": ...} for an NfedError."""
    try:
        result = measure()
    except NfedError as exc:
        result = {"error": str(exc)}
    print(json.dumps(result))


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident memory in MiB of this process (or, with RUSAGE_CHILDREN, of its largest waited-for child)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024
