#!/usr/bin/env bash
# The GPU check (about 8 minutes on one GPU), printing one table at the end:
#   1. the CPU tests of the GPU support (tests/system/test_gpu.py, tests/unit/test_fake_images.py; any machine);
#   2. the CUDA-marked tests (pytest -m cuda), which include the CPU-vs-GPU agreement check on a short simulation;
#   3. benchmarks/gpu.py (Ditto simulation vs plain loop per GPU share; robust aggregation GPU vs CPU vs Flower).
# Without CUDA it says so after step 1 and exits with its status (0: its tests passed). Logs go to $GPU_CHECK_DIR
# (default outputs/gpu_check). Extra arguments go to benchmarks/gpu.py (e.g. --quick, --cap 10).
set -uo pipefail
source "$(dirname "$0")/env.sh"
cd "$ROOT"
LOGS="${GPU_CHECK_DIR:-$ROOT/outputs/gpu_check}"
mkdir -p "$LOGS"
ROWS=()

step() {  # step NAME LOG TIMEOUT COMMAND...: run it, keep its last line as the result, add a row
  local name="$1" log="$2" limit="$3" start rc summary
  shift 3
  echo "== $name: $*" >&2
  start=$(date +%s)
  timeout "$limit" "$@" >"$log" 2>&1
  rc=$?
  tail -n 3 "$log" >&2
  summary=$(grep -E "passed|failed|skipped|error" "$log" | tail -n 1 | sed 's/=//g; s/^ *//; s/ *$//')
  [ "$rc" -eq 124 ] && summary="stopped after ${limit} s"
  ROWS+=("$(printf '%-34s %-6s %6ss  %s' "$name" "$([ "$rc" -eq 0 ] && echo ok || echo FAIL)" \
    "$(( $(date +%s) - start ))" "${summary:-see $log}")")
  return "$rc"
}

table() {
  echo
  local name
  name=$(python -c 'import torch; print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA")')
  echo "GPU check ($name, $(date -u +%Y-%m-%dT%H:%MZ))"
  printf '%-34s %-6s %7s  %s\n' "step" "status" "time" "result"
  printf '%s\n' "${ROWS[@]}"
}

CUDA=$(python -c "import torch; print(int(torch.cuda.is_available()))")
# the 8-minute budget is a GPU machine's (16 cores); a CPU-only machine may be slower, and has no budget to keep
step "CPU tests of the GPU support" "$LOGS/cpu_tests.log" "$([ "$CUDA" = 1 ] && echo 90 || echo 900)" \
  python -m pytest tests/system/test_gpu.py tests/unit/test_fake_images.py -q -p no:cacheprovider
cpu_rc=$?

if [ "$CUDA" != 1 ]; then
  ROWS+=("$(printf '%-34s %-6s %7s  %s' "CUDA tests, agreement, benchmarks" "skip" "-" \
    "no CUDA: torch $(python -c 'import torch; print(torch.__version__)') sees no CUDA device here")")
  table
  echo
  echo "No CUDA device on this machine: the CPU part is done; run this script on a GPU machine for the rest."
  exit "$cpu_rc"
fi

step "CUDA tests (with CPU-vs-GPU run)" "$LOGS/cuda_tests.log" 120 python -m pytest -m cuda -q -p no:cacheprovider -s
cuda_rc=$?
step "benchmarks/gpu.py" "$LOGS/benchmark.log" 270 python -m benchmarks.gpu "$@"
bench_rc=$?
table
echo
grep -E "^(global|personal): benign acc" "$LOGS/cuda_tests.log" | sed 's/^/agreement, /'
sed -n '/^Ditto, simulation/,$p' "$LOGS/benchmark.log"
[ "$cpu_rc" -eq 0 ] && [ "$cuda_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ]
