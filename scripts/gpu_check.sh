#!/usr/bin/env bash
# The GPU check (docs/gpu.md), one command, under 8 minutes on one GPU:
#   1. the CUDA tests (tests/test_cuda.py: training in fp32/bf16/fp16, GPU against CPU, a
#      GPU-trained model on a CPU-only machine), at most TESTS_LIMIT (100) seconds (60 on an H200);
#   2. the `gpu` benchmark section: training images/s against torchvision's (limit, real loop
#      from shards, peer), inference, peak memory, channels_last, then torch.compile; its own
#      time limits inside (benchmark.gpu.time_limit_s, 320: no part starts later; compile_limit_s,
#      100, per compile), the whole at most BENCH_LIMIT (360) seconds.
# One JSON of figures (--out, default reports/gpu-check.json; the device, torch and CUDA versions
# go beside it, reports/gpu-check-setup.json) and the tests' JUnit report
# (reports/gpu-check-tests.xml). Killed at BENCH_LIMIT, the benchmark leaves what it measured in
# reports/gpu-check-partial.json, with the part it was running named in "running".
#
# Usage: scripts/gpu_check.sh [--dry-run] [--tests PYTEST_K_EXPR] [--out FILE] [--set key=value ...]
#   --dry-run   on the CPU at the smallest sizes: proves the check runs; no figure is a GPU's
#   --tests     only the CUDA tests matching this pytest -k expression
#   --set       benchmark overrides, e.g. --set gpu.batches=[64]
# The loop reads frame shards (benchmark.gpu.shards, data/shards/voc): made from the embedded
# sample when missing. Exit status: the tests' if they failed, else the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."
# The project's virtual environment (README's setup) when there is one, else the machine's python3.
if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
out=reports/gpu-check.json
dry=0
tests_k=""
sets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry=1 ;;
    --tests) tests_k="$2"; shift ;;
    --out) out="$2"; shift ;;
    --set) sets+=(--set "$2"); shift ;;
    *) echo "gpu_check.sh: unknown argument $1 (see the usage at the top of the script)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$(dirname "$out")"
setup="${out%.json}-setup.json"
junit="${out%.json}-tests.xml"

# A machine without the less common dependencies (a GPU image with torch but no webdataset):
# the wheels scripts/gpu_wheels.sh put in .whl/, installed where this run alone sees them.
if ! "$PYTHON" -c "import webdataset, onnxsim, faster_coco_eval, torch_pruning" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    echo "gpu_check.sh: webdataset, onnxsim, faster-coco-eval or torch-pruning missing and no .whl/ (scripts/gpu_wheels.sh)" >&2
    exit 2
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 2
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "$dry" = 1 ]; then
  export CUDA_VISIBLE_DEVICES="" SSD_GPU_TESTS_ON_CPU=1
  sets=(--set gpu.dry_run=true "${sets[@]}")
elif ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA device here (nvidia-smi: $(nvidia-smi -L 2>&1 | head -1)); --dry-run runs the check on the CPU" >&2
  exit 2
fi

shards=$("$PYTHON" - "${sets[@]}" <<'PY'
import sys
from pipeline.bench.config import BenchmarkConfig
from pipeline.config import load_config, load_params
overrides = [a for a in sys.argv[1:] if a != "--set"]
print(load_config(BenchmarkConfig, load_params("params.yaml"), "benchmark", overrides, "params.yaml").gpu.shards)
PY
) || exit 2
if ! ls "$shards"/train-*.tar >/dev/null 2>&1; then
  echo "gpu_check.sh: no train shards in $shards: making them from the embedded sample" >&2
  "$PYTHON" -m pipeline.sample && "$PYTHON" -m pipeline.prepare || exit 2
fi

k_args=()
[ -n "$tests_k" ] && k_args=(-k "$tests_k")
timeout "${TESTS_LIMIT:-100}" "$PYTHON" -m pytest -q -p no:cacheprovider -m gpu tests/test_cuda.py \
  "${k_args[@]}" --junitxml="$junit"
tests_status=$?

partial="${out%.json}-partial.json"
rm -f "$partial"
timeout "${BENCH_LIMIT:-360}" "$PYTHON" -m pipeline.benchmark --only gpu --out "$out" --set threads=0 \
  --set "setup=$setup" --set "gpu.tests_junit=$junit" --set "gpu.partial=$partial" "${sets[@]}"
bench_status=$?
if [ "$bench_status" -eq 124 ] && [ -f "$partial" ]; then
  echo "gpu_check.sh: the benchmark ran past BENCH_LIMIT (${BENCH_LIMIT:-360} s); what it measured is in $partial" >&2
fi

echo "gpu_check.sh: tests exit $tests_status, benchmark exit $bench_status; figures in $out, setup in $setup" >&2
[ "$tests_status" -ne 0 ] && [ "$tests_status" -ne 5 ] && exit "$tests_status"
exit "$bench_status"
