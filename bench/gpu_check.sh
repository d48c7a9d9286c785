#!/usr/bin/env bash
# GPU acceptance check (issue 6): the gpu-marked tests, then `nfed bench kernels` (fp32, tf32, bf16),
# `nfed bench step` (fp32, tf32, bf16) and `nfed bench aggregate` on this machine's GPU(s).
#
#   bash bench/gpu_check.sh OUTDIR          (PYTHON=/path/to/python to choose the interpreter)
#
# Never downloads anything: it checks the imports first and stops with a clear message when one is
# missing. Works from a checkout (PYTHONPATH is set to it when nfed is not installed) or after
# `pip install --no-build-isolation --no-deps .`. Budgeted to finish in under 8 minutes on one H100/H200:
# each step has its own timeout and steps are skipped once the total budget is spent.
# OUTDIR receives at most 8 files: summary.json, gpu_tests.log, kernels_{fp32,tf32,bf16}.json,
# step.json, aggregate.json, gpu_check.log. Exit status 0 only when every step passed.
set -uo pipefail

out=${1:?usage: bash bench/gpu_check.sh OUTDIR}
repo=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$out" && out=$(cd "$out" && pwd)
py=${PYTHON:-python3}
budget=${GPU_CHECK_BUDGET_S:-450}
start=$(date +%s)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$out/gpu_check.log"
: >"$log"
say() { echo "gpu_check: $*" | tee -a "$log" >&2; }

# --- 1. what this machine has (no installs, no network) ----------------------------------------------------
if ! "$py" - >"$work/environment.json" 2>>"$log" <<'EOF'
import importlib, json, platform, sys, warnings
need = {"numpy": "numpy", "scipy": "scipy", "PIL": "pillow", "click": "click", "h5py": "h5py",
        "pytest": "pytest", "cupy": "cupy-cuda13x (or cupy-cuda12x)", "torch": "torch (the cuDNN reference)"}
versions, missing = {}, []
for module, package in need.items():
    try:
        imported = importlib.import_module(module)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            versions[module] = str(getattr(imported, "__version__", "?"))
    except Exception as exc:  # any import failure counts as missing
        missing.append(f"{package}: {type(exc).__name__}: {exc}")
if missing:
    print("gpu_check: missing Python packages (this script never downloads; install them from local "
          "wheels or use an interpreter that has them via PYTHON=...):\n  " + "\n  ".join(missing), file=sys.stderr)
    sys.exit(1)
import cupy, torch
count = cupy.cuda.runtime.getDeviceCount()
if count < 1:
    print("gpu_check: CuPy sees no CUDA device", file=sys.stderr)
    sys.exit(1)
names = []
for i in range(count):
    name = cupy.cuda.runtime.getDeviceProperties(i)["name"]
    names.append(name.decode() if isinstance(name, bytes) else str(name))
json.dump({"python": sys.version.split()[0], "platform": platform.platform(), "packages": versions,
           "gpus": names, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion(),
           "cudnn": torch.backends.cudnn.version()}, sys.stdout)
EOF
then
  cat "$log" >&2
  say "environment check failed (messages above); nothing was run"
  "$py" -c "import json,sys; json.dump({'passed': False, 'error': 'environment check failed, see gpu_check.log'}, open(sys.argv[1], 'w'))" "$out/summary.json" 2>/dev/null
  exit 2
fi
if ! "$py" -c "import nfed" >/dev/null 2>&1; then
  export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
  say "nfed is not installed: running from the checkout $repo"
fi
if ! "$py" -c "from nfed.common.resources import kernels_dir, data_dir; kernels_dir(); data_dir()" 2>>"$log"; then
  say "nfed cannot find its kernels/ or data/ folder; nothing was run"
  exit 2
fi
say "$(cat "$work/environment.json")"

# --- 2. the steps ----------------------------------------------------------------------------------------------
steps_file="$work/steps.tsv"
: >"$steps_file"
failed=0
nfed_cli=("$py" -c "from nfed.cli import main; main()")

# run NAME TIMEOUT_S STDOUT_FILE COMMAND...: one step, its status recorded; skipped past the budget.
run() {
  local name=$1 limit=$2 stdout=$3
  shift 3
  local now elapsed rc t0
  now=$(date +%s)
  elapsed=$((now - start))
  if ((elapsed + 15 > budget)); then
    say "skip $name: time budget spent (${elapsed}s of ${budget}s)"
    printf '%s\t%s\t%s\n' "$name" skipped 0 >>"$steps_file"
    failed=1
    return
  fi
  ((limit > budget - elapsed)) && limit=$((budget - elapsed))
  say "run  $name (limit ${limit}s)"
  t0=$(date +%s)
  timeout --kill-after=10 "$limit" "$@" >"$stdout" 2>>"$log"
  rc=$?
  printf '%s\t%s\t%s\n' "$name" "$rc" "$(($(date +%s) - t0))" >>"$steps_file"
  if ((rc != 0)); then
    failed=1
    say "FAIL $name (exit $rc$( ((rc == 124)) && echo ', timed out'))"
  else
    say "ok   $name ($(($(date +%s) - t0))s)"
  fi
}

# gpu-marked tests of the whole suite (the CPU tests run in CI); -o addopts= drops the "not slow" filter.
run gpu_tests 170 "$out/gpu_tests.log" \
  "$py" -m pytest "$repo/tests" -m gpu -q -rfEs -o addopts= -p no:cacheprovider --rootdir "$repo"

for precision in fp32 tf32 bf16; do
  run "kernels_$precision" 70 "$work/kernels_$precision.stdout" \
    "${nfed_cli[@]}" bench kernels --device cuda --precision "$precision" --repeat 3 --warmup 1 \
    --out "$out/kernels_$precision.json"
done

# bench step runs each side in a fresh interpreter: nfed's ops send CuPy arrays to the CUDA kernels by
# themselves (nfed.core.dispatch), nothing to set up.
# fp32: NVIDIA_TF32_OVERRIDE=0 keeps cuDNN (whose PyTorch default allows TF32) and cuBLAS in true fp32
run step_fp32 75 "$work/step_fp32.json" env NFED_PRECISION=fp32 NVIDIA_TF32_OVERRIDE=0 \
  "${nfed_cli[@]}" bench step --device cuda --width 64 --tile 256 --batch 8 --repeat 3 --warmup 1 --json
run step_tf32 60 "$work/step_tf32.json" env NFED_PRECISION=tf32 \
  "${nfed_cli[@]}" bench step --device cuda --width 64 --tile 256 --batch 8 --repeat 3 --warmup 1 --json
# bf16: PyTorch's twin has no autocast switch in bench step, so nfed alone (reference: 53.7 ms, issue 6)
run step_bf16 40 "$work/step_bf16.json" env NFED_PRECISION=bf16 \
  "${nfed_cli[@]}" bench step --device cuda --width 64 --tile 256 --batch 8 --repeat 3 --warmup 1 --json \
  --no-reference

run aggregate 45 "$work/aggregate.stdout" \
  "${nfed_cli[@]}" bench aggregate --device cuda --models 25 --parameters 67.3e6 --repeat 10 --warmup 2 \
  --out "$out/aggregate.json"

# --- 3. summary ---------------------------------------------------------------------------------------------
"$py" - "$work" "$out" "$failed" "$start" <<'EOF' 2>>"$log"
import json, sys, time
from pathlib import Path
work, out, failed, start = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", float(sys.argv[4])
steps = []
for line in (work / "steps.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    steps.append({"name": name, "status": rc if rc == "skipped" else int(rc), "seconds": int(seconds)})
step = {}
for precision in ("fp32", "tf32", "bf16"):
    path = work / f"step_{precision}.json"
    try:
        step[precision] = json.loads(path.read_text())
    except Exception:
        step[precision] = None
(out / "step.json").write_text(json.dumps(step, indent=2))
summary = {"passed": not failed, "seconds": round(time.time() - start), "steps": steps,
           "environment": json.loads((work / "environment.json").read_text())}
headline = {}
for precision in ("fp32", "tf32", "bf16"):
    try:
        k = json.loads((out / f"kernels_{precision}.json").read_text())
        headline[f"kernels_{precision}_geomean_ratio"] = [d["geomean_ratio"] for d in k["devices"]]
    except Exception:
        pass
    s = step.get(precision)
    if s:
        headline[f"step_{precision}_ms"] = 1e3 * s["nfed_s_per_step"]
        headline[f"step_{precision}_ratio"] = s.get("ratio")
try:
    a = json.loads((out / "aggregate.json").read_text())
    headline["fedavg_fraction_of_copy"] = [d["nfed_kernel_fraction_of_copy"] for d in a["devices"]]
except Exception:
    pass
summary["headline"] = headline
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary["headline"], indent=2))
EOF
cat "$work"/kernels_*.stdout "$work/aggregate.stdout" >>"$log" 2>/dev/null
say "done in $(($(date +%s) - start))s; results in $out"
exit "$failed"
