"""One full W-Net-CD training step (forward, backward, Adam), or one inference forward (evaluation mode, no
graph; PyTorch under torch.no_grad()), timed in nfed and in PyTorch in the same run (`nfed bench step`).

Each side runs in its own fresh Python process, one after the other (nfed.benchmarks.isolated), so each
reports its own peak resident memory and neither pays for the other's imports or caches. The reference is
the PyTorch twin nfed.benchmarks.torch_twin (same layers, same names); without torch it is reported as null
with the reason.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time

from nfed.benchmarks.isolated import answer, json_worker, peak_rss_mb
from nfed.common import backend
from nfed.common.errors import ConfigError, NfedError
from nfed.core.functions.parallel import ENV_THREADS


def step_task(*, device: str, precision: str | None, width: int, tile: int, batch: int, lambda_rec: float,
              repeat: int, warmup: int, inference: bool = False, threads: int | None = None, cprofile_top: int = 0,
              op_profile: bool = False) -> dict:
    """The checked settings of one benchmark, as both sides' processes receive them (JSON)."""
    device = str(backend.parse_device(device))
    if width < 1 or batch < 1 or repeat < 1 or warmup < 0:
        raise ConfigError("--width, --batch and --repeat must be >= 1 and --warmup >= 0")
    if tile < 16 or tile % 16:
        raise ConfigError(f"--tile {tile}: must be a positive multiple of 16 (W-Net pools 4 times)")
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads {threads}: must be >= 1")
    return {"device": device, "precision": precision, "width": width, "tile": tile, "batch": batch,
            "lambda_rec": lambda_rec, "repeat": repeat, "warmup": warmup, "cprofile_top": cprofile_top,
            "mode": "eval" if inference else "train", "op_profile": op_profile, "threads": threads}


def run_step_bench(task: dict, *, reference: bool = True) -> dict:
    """nfed's side, then (unless told not to) PyTorch's: the settings, nfed_* and reference_* figures, and the
    img/s and peak-memory ratios (nfed / PyTorch; null with reference_note when PyTorch was not measured)."""
    result = {key: task[key] for key in ("device", "precision", "mode", "width", "tile", "batch", "lambda_rec",
                                         "repeat")}
    result.update(cpu_count=os.cpu_count(), threads=task["threads"])
    nfed_side = _run_side("nfed", task)
    result.update({f"nfed_{k}": v for k, v in nfed_side.items()})
    measured = None
    if not reference:
        result["reference_note"] = "skipped (--no-reference)"
    else:
        try:
            measured = _run_side("torch", task)
        except NfedError as exc:
            result["reference_note"] = str(exc)
    if measured is not None:
        result.update({f"reference_{k}": v for k, v in measured.items()})
        result["ratio"] = nfed_side["img_per_s"] / measured["img_per_s"]
        result["memory_ratio"] = nfed_side["peak_rss_mb"] / measured["peak_rss_mb"]
    else:
        result.update({"reference_img_per_s": None, "reference_peak_rss_mb": None, "ratio": None})
    return result


def report_lines(result: dict) -> list[str]:
    """The human-readable report of run_step_bench's result."""
    what = "inference forward" if result["mode"] == "eval" else "training step"
    lines = [f"W-Net-CD {what}, w {result['width']}, tile {result['tile']}, batch {result['batch']}, "
             f"{result['device']}, {result['repeat']} steps",
             f"nfed      {result['nfed_s_per_step']:.3f} s/step  {result['nfed_img_per_s']:8.1f} img/s  "
             f"peak RSS {result['nfed_peak_rss_mb']:.0f} MB  ({result['nfed_blas']}){_busy(result, 'nfed')}"]
    if result["ratio"] is not None:
        lines += [f"pytorch   {result['reference_s_per_step']:.3f} s/step  {result['reference_img_per_s']:8.1f} img/s  "
                  f"peak RSS {result['reference_peak_rss_mb']:.0f} MB  ({result['reference_version']})"
                  f"{_busy(result, 'reference')}",
                  f"ratio (nfed / pytorch img/s): {result['ratio']:.2f}"]
    else:
        lines.append(f"pytorch   not measured: {result['reference_note']}")
    if "nfed_op_profile" in result:
        lines.append("nfed time per step by op (mean over the timed steps; wall time, worker pool included):")
        lines += [f"  {name:32s} {ms:8.2f} ms  {share:5.1%}" for name, ms, share in result["nfed_op_profile"]]
    return lines


def _busy(result: dict, side: str) -> str:
    """", 1.52 cores busy" when the side reported its CPU use (results of older versions did not)."""
    cores = result.get(f"{side}_cores_busy")
    return "" if cores is None else f", {cores:.2f} cores busy"


def _run_side(side: str, task: dict) -> dict:
    """Run one side in a fresh interpreter; it prints one JSON line with its timings and peak memory."""
    code = "import sys; from nfed.benchmarks.step import worker_main; worker_main(sys.argv[1], sys.argv[2])"
    env = dict(os.environ)
    if task.get("threads"):
        env[ENV_THREADS] = str(task["threads"])
    return json_worker(code, [side, json.dumps(task)], f"{side} benchmark", env=env,
                       echo_stderr=bool(task.get("cprofile_top")) and side == "nfed")


def worker_main(side: str, task_json: str) -> None:
    """Entry point of a benchmark subprocess (prints one JSON object)."""
    task = json.loads(task_json)

    def measure() -> dict:
        timed = _nfed_steps(task) if side == "nfed" else _torch_steps(task)
        seconds = sorted(timed.pop("seconds"))
        median = seconds[len(seconds) // 2]
        timed.update({"s_per_step": median, "s_per_step_min": seconds[0], "img_per_s": task["batch"] / median,
                      "peak_rss_mb": peak_rss_mb()})
        return timed

    answer(measure)


def _inputs(task: dict):
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (task["batch"], 3, task["tile"], task["tile"])
    past = rng.random(shape, dtype=np.float32)
    current = rng.random(shape, dtype=np.float32)
    mask = (rng.random((task["batch"], task["tile"], task["tile"])) > 0.8).astype(np.int64)
    return past, current, mask


def _timed(call, task: dict, around=contextlib.nullcontext) -> dict:
    """{"seconds": of each of task["repeat"] calls after task["warmup"] untimed ones, "cores_busy": the process's
    CPU time over the wall time of those calls (all threads: how many cores the side kept busy on average; an
    OpenMP runtime such as PyTorch's spins between parallel regions, so its figure counts that waiting too)};
    around() wraps the timed calls."""
    for _ in range(task["warmup"]):
        call()
    seconds = []
    with around():
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        for _ in range(task["repeat"]):
            start = time.perf_counter()
            call()
            seconds.append(time.perf_counter() - start)
        cores_busy = (time.process_time() - cpu_start) / max(time.perf_counter() - wall_start, 1e-9)
    return {"seconds": seconds, "cores_busy": cores_busy}


def _nfed_steps(task: dict) -> dict:
    from nfed import __version__
    from nfed.core.autograd import no_grad
    from nfed.core.functions.parallel import blas_kernels
    from nfed.training.environment import RunEnvironment
    from nfed.training.trainer import TrainConfig, build_model, build_optimizer

    config = TrainConfig(width=task["width"], lambda_rec=task["lambda_rec"])
    RunEnvironment(task["device"], task.get("precision") or "fp32").apply()   # the task's, not an inherited one
    device = backend.parse_device(task["device"])
    model = build_model(config, task["device"])
    optimizer = build_optimizer(model, config)
    past, current, mask = (backend.to_device(a, device) for a in _inputs(task))

    def train_step():
        optimizer.zero_grad()
        loss, _, _ = model.loss(past, current, mask)
        loss.backward()
        optimizer.step()
        backend.synchronize(device)

    def forward():
        with no_grad():
            model(past, current)
        backend.synchronize(device)

    if task["mode"] == "eval":
        model.eval()
    ops = _OpProfile(optimizer) if task.get("op_profile") else None

    @contextlib.contextmanager
    def around():
        with ops if ops is not None else contextlib.nullcontext(), _cprofile(task.get("cprofile_top", 0)):
            yield

    result = _timed(forward if task["mode"] == "eval" else train_step, task, around)
    result.update(version=f"nfed {__version__}", blas=blas_kernels())
    if ops is not None:
        result["op_profile"] = ops.table(sum(result["seconds"]), len(result["seconds"]))
    if device.is_gpu:  # CuPy's pool keeps what it allocated: its size is the peak reserved memory
        result["peak_gpu_mb"] = backend.cupy_module().get_default_memory_pool().total_bytes() / 2**20
    return result


@contextlib.contextmanager
def _cprofile(top: int):
    """With top > 0, profile the block and print its `top` functions by total time to stderr."""
    if not top:
        yield
        return
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(top)


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
    from nfed.benchmarks import torch_twin  # NfedError without torch: the reference is then reported as null

    torch = torch_twin.torch

    device = backend.parse_device(task["device"])
    torch_device = torch.device(f"cuda:{device.index}" if device.is_gpu else "cpu")
    if task.get("threads"):
        torch.set_num_threads(task["threads"])
    torch.manual_seed(0)
    model = torch_twin.WNetCD(task["width"], 2, task["lambda_rec"]).to(torch_device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    past, current, mask = (torch.from_numpy(a).to(torch_device) for a in _inputs(task))

    # The reference runs at the same precision as nfed: PyTorch's own default lets cuDNN use TF32.
    precision = task.get("precision") or "fp32"
    torch.backends.cudnn.allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"

    def at_precision():
        if precision == "bf16":
            return torch.autocast(torch_device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def synchronize():
        if device.is_gpu:
            torch.cuda.synchronize(torch_device)

    def train_step():
        optimizer.zero_grad()
        with at_precision():
            loss = model.loss(past, current, mask)
        loss.backward()
        optimizer.step()
        synchronize()

    def forward():
        with torch.no_grad(), at_precision():
            model(past, current)
        synchronize()

    if task["mode"] == "eval":
        model.eval()
    result = _timed(forward if task["mode"] == "eval" else train_step, task)
    result["version"] = f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    if device.is_gpu:
        result["peak_gpu_mb"] = torch.cuda.max_memory_reserved(torch_device) / 2**20
    return result
