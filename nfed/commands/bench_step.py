"""`nfed bench step`: time one full W-Net-CD training step (forward, backward, Adam) against PyTorch, or with
--eval one inference forward (evaluation mode, no graph; PyTorch under torch.no_grad()).

Each side runs in its own fresh Python process, one after the other in the same invocation, so each
reports its own peak resident memory (ru_maxrss) and neither pays for the other's imports or caches.
The reference is the PyTorch twin in the checkout's bench/torch_wnet.py (same layers, same names), loaded
by path: nfed itself never imports torch, and without torch or without the checkout the reference is
reported as null with the reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

from nfed.common import backend
from nfed.core.functions.parallel import ENV_THREADS
from nfed.commands.options import device_option, limited, precision_option
from nfed.common.errors import ConfigError, NfedError

TWIN_PATH = Path(__file__).resolve().parents[2] / "bench" / "torch_wnet.py"


@click.command("step")
@device_option
@precision_option
@click.option("--width", type=limited("width"), default=8, show_default=True, help="W-Net base width w")
@click.option("--tile", type=limited("tile"), default=64, show_default=True, help="tile size (multiple of 16)")
@click.option("--batch", type=limited("batch_size"), default=8, show_default=True, help="image pairs per step")
@click.option("--lambda-rec", type=limited("lambda_rec"), default=0.1, show_default=True, help="reconstruction weight")
@click.option("--repeat", type=limited("repeat"), default=5, show_default=True, help="timed steps (after --warmup)")
@click.option("--warmup", type=limited("warmup"), default=2, show_default=True, help="untimed steps first")
@click.option("--eval", "inference", is_flag=True, help="time the inference forward (eval mode, no graph) instead")
@click.option("--threads", type=limited("threads"), default=None,
              help="CPU threads for both sides (NFED_NUM_THREADS / torch.set_num_threads; default: all usable CPUs)")
@click.option("--no-reference", is_flag=True, help="time nfed only")
@click.option("--cprofile", "cprofile_top", type=limited("cprofile_top"), default=0,
              help="also profile nfed's timed steps and print the top N functions (by total time) to stderr")
@click.option("--op-profile", is_flag=True,
              help="also report where nfed's step goes: time per op and phase, the optimiser, the rest (CPU)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def step(device, precision, width, tile, batch, lambda_rec, repeat, warmup, inference, threads, no_reference,
         cprofile_top, op_profile, as_json):
    """Training-step (or --eval inference) throughput of nfed vs the same model in PyTorch, in the same run."""
    device = str(backend.parse_device(device))
    if width < 1 or batch < 1 or repeat < 1 or warmup < 0:
        raise ConfigError("--width, --batch and --repeat must be >= 1 and --warmup >= 0")
    if tile < 16 or tile % 16:
        raise ConfigError(f"--tile {tile}: must be a positive multiple of 16 (W-Net pools 4 times)")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    mode = "eval" if inference else "train"
    task = {"device": device, "precision": precision, "width": width, "tile": tile, "batch": batch,
            "lambda_rec": lambda_rec, "repeat": repeat, "warmup": warmup, "cprofile_top": cprofile_top, "mode": mode,
            "op_profile": op_profile, "threads": threads}
    result = {"device": device, "precision": precision, "mode": mode, "width": width, "tile": tile, "batch": batch,
              "lambda_rec": lambda_rec, "repeat": repeat, "cpu_count": os.cpu_count(), "threads": threads}
    nfed_side = _run_worker("nfed", task)
    result.update({f"nfed_{k}": v for k, v in nfed_side.items()})
    reference = None
    if no_reference:
        result["reference_note"] = "skipped (--no-reference)"
    else:
        try:
            reference = _run_worker("torch", task)
        except NfedError as exc:
            result["reference_note"] = str(exc)
    if reference is not None:
        result.update({f"reference_{k}": v for k, v in reference.items()})
        result["ratio"] = nfed_side["img_per_s"] / reference["img_per_s"]
        result["memory_ratio"] = nfed_side["peak_rss_mb"] / reference["peak_rss_mb"]
    else:
        result.update({"reference_img_per_s": None, "reference_peak_rss_mb": None, "ratio": None})
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    what = "inference forward" if inference else "training step"
    click.echo(f"W-Net-CD {what}, w {width}, tile {tile}, batch {batch}, {device}, {repeat} steps")
    click.echo(f"nfed      {nfed_side['s_per_step']:.3f} s/step  {nfed_side['img_per_s']:8.1f} img/s  "
               f"peak RSS {nfed_side['peak_rss_mb']:.0f} MB  ({nfed_side['blas']})")
    if reference is not None:
        click.echo(f"pytorch   {reference['s_per_step']:.3f} s/step  {reference['img_per_s']:8.1f} img/s  "
                   f"peak RSS {reference['peak_rss_mb']:.0f} MB  ({reference['version']})")
        click.echo(f"ratio (nfed / pytorch img/s): {result['ratio']:.2f}")
    else:
        click.echo(f"pytorch   not measured: {result['reference_note']}")
    if op_profile:
        click.echo("nfed time per step by op (mean over the timed steps; wall time, worker pool included):")
        for name, ms, share in nfed_side["op_profile"]:
            click.echo(f"  {name:32s} {ms:8.2f} ms  {share:5.1%}")


def _run_worker(side: str, task: dict) -> dict:
    """Run one side in a fresh interpreter; it prints one JSON line with its timings and peak memory."""
    code = "import sys; from nfed.commands.bench_step import worker_main; worker_main(sys.argv[1], sys.argv[2])"
    env = dict(os.environ)
    if task.get("threads"):
        env[ENV_THREADS] = str(task["threads"])
    return json_worker(code, [side, json.dumps(task)], f"{side} benchmark", env=env,
                       echo_stderr=bool(task.get("cprofile_top")) and side == "nfed")


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


def worker_main(side: str, task_json: str) -> None:
    """Entry point of a benchmark subprocess (prints one JSON object)."""
    task = json.loads(task_json)
    try:
        timed = _nfed_steps(task) if side == "nfed" else _torch_steps(task)
    except NfedError as exc:
        print(json.dumps({"error": str(exc)}))
        return
    seconds = sorted(timed.pop("seconds"))
    median = seconds[len(seconds) // 2]
    timed.update({"s_per_step": median, "s_per_step_min": seconds[0], "img_per_s": task["batch"] / median,
                  "peak_rss_mb": _peak_rss_mb()})
    print(json.dumps(timed))


def _inputs(task: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (task["batch"], 3, task["tile"], task["tile"])
    past = rng.random(shape, dtype=np.float32)
    current = rng.random(shape, dtype=np.float32)
    mask = (rng.random((task["batch"], task["tile"], task["tile"])) > 0.8).astype(np.int64)
    return past, current, mask


def _nfed_steps(task: dict) -> dict:
    from nfed.core.autograd import no_grad
    from nfed.training.environment import RunEnvironment
    from nfed.training.trainer import TrainConfig, build_model, build_optimizer

    config = TrainConfig(width=task["width"], lambda_rec=task["lambda_rec"])
    RunEnvironment(task["device"], task.get("precision") or "fp32").apply()   # the task's, not an inherited one
    device = backend.parse_device(task["device"])
    model = build_model(config, task["device"])
    optimizer = build_optimizer(model, config)
    past, current, mask = (backend.to_device(a, device) for a in _inputs(task))

    def one_step():
        optimizer.zero_grad()
        loss, _, _ = model.loss(past, current, mask)
        loss.backward()
        optimizer.step()
        backend.synchronize(device)

    def one_forward():
        with no_grad():
            model(past, current)
        backend.synchronize(device)

    if task.get("mode") == "eval":
        model.eval()
        one_step = one_forward

    for _ in range(task["warmup"]):
        one_step()
    profiler = None
    if task.get("cprofile_top"):
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    seconds = []
    ops = _OpProfile(optimizer) if task.get("op_profile") else None
    with ops if ops is not None else contextlib.nullcontext():
        for _ in range(task["repeat"]):
            start = time.perf_counter()
            one_step()
            seconds.append(time.perf_counter() - start)
    if profiler is not None:
        import pstats

        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(task["cprofile_top"])
    from nfed.core.functions.parallel import blas_kernels

    result = {"seconds": seconds, "version": _nfed_version(), "blas": blas_kernels()}
    if ops is not None:
        result["op_profile"] = ops.table(sum(seconds), len(seconds))
    if device.is_gpu:  # CuPy's pool keeps what it allocated: its size is the peak reserved memory
        result["peak_gpu_mb"] = backend.cupy_module().get_default_memory_pool().total_bytes() / 2**20
    return result


class _OpProfile:
    """Time per (op, phase) through autograd.op_timer, plus the optimiser's step, over the timed steps;
    table() gives [name, ms per step, share of the step] with the remainder as "other"."""

    def __init__(self, optimizer):
        self.seconds: dict[str, float] = {}
        self.optimizer = optimizer
        self.timer = None

    def record(self, phase: str, function, seconds: float) -> None:
        name = f"{type(function).__name__} {phase}"
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def __enter__(self):
        from nfed.core.autograd import op_timer

        step = self.optimizer.step

        def timed_step():
            start = time.perf_counter()
            step()
            self.record("step", self.optimizer, time.perf_counter() - start)

        self.optimizer.step = timed_step
        self.timer = op_timer(self.record)
        self.timer.__enter__()
        return self

    def __exit__(self, *exc):
        self.timer.__exit__(*exc)
        del self.optimizer.step  # the instance attribute goes, the class's method is back

    def table(self, total_seconds: float, steps: int) -> list:
        rows = sorted(self.seconds.items(), key=lambda item: -item[1])
        rows.append(("other (autograd, Python glue)", total_seconds - sum(self.seconds.values())))
        return [[name, 1e3 * seconds / steps, seconds / total_seconds] for name, seconds in rows]


def _torch_steps(task: dict) -> dict:
    if not TWIN_PATH.is_file():
        raise NfedError(f"PyTorch twin not found at {TWIN_PATH} (run from a checkout of nfed)")
    try:
        import torch
    except ImportError:
        raise NfedError("PyTorch is not installed (pip install 'nfed[bench]')") from None
    import importlib.util

    spec = importlib.util.spec_from_file_location("nfed_bench_torch_wnet", TWIN_PATH)
    twin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(twin)
    device = backend.parse_device(task["device"])
    torch_device = torch.device(f"cuda:{device.index}" if device.is_gpu else "cpu")
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    torch.manual_seed(0)
    model = twin.WNetCD(task["width"], 2, task["lambda_rec"]).to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    past, current, mask = (torch.from_numpy(a).to(torch_device) for a in _inputs(task))

    # The reference runs at the same precision as nfed: PyTorch's own default lets cuDNN use TF32.
    precision = task.get("precision") or "fp32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    autocast_dtype = torch.bfloat16 if precision == "bf16" else None

    def one_step():
        optimizer.zero_grad()
        if autocast_dtype is not None:
            with torch.autocast(torch_device.type, dtype=autocast_dtype):
                loss = model.loss(past, current, mask)
        else:
            loss = model.loss(past, current, mask)
        loss.backward()
        optimizer.step()
        if device.is_gpu:
            torch.cuda.synchronize(torch_device)

    def one_forward():
        with torch.no_grad(), torch.autocast(torch_device.type, dtype=autocast_dtype or torch.float32,
                                             enabled=autocast_dtype is not None):
            model(past, current)
        if device.is_gpu:
            torch.cuda.synchronize(torch_device)

    if task.get("mode") == "eval":
        model.eval()
        one_step = one_forward

    for _ in range(task["warmup"]):
        one_step()
    seconds = []
    for _ in range(task["repeat"]):
        start = time.perf_counter()
        one_step()
        seconds.append(time.perf_counter() - start)
    result = {"seconds": seconds, "version": f"torch {torch.__version__}, {torch.get_num_threads()} threads"}
    if device.is_gpu:
        result["peak_gpu_mb"] = torch.cuda.max_memory_reserved(torch_device) / 2**20
    return result


def _peak_rss_mb() -> float:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _nfed_version() -> str:
    from nfed import __version__

    return f"nfed {__version__}"
