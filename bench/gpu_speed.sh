#!/usr/bin/env bash
# Issue 13's GPU measurements in one command for a lent H100/H200 (torch 2.11 + cu130, triton 3.6, no
# network), inside one time budget (GPU_SPEED_BUDGET_S, default 530 s): the modes side by side
# (bench.speed), the exact mode's GPU tests, the serving sweep through the worker, the fused-kernel bench.
# Steps run most valuable first; each gets min(its cap, what is left). Results land in $OUT (default
# bench/out): conditions.txt, gpu_speed.log, speed.json, gpu_tests.log, serving.json, fused_bench.json.
#
#   bash bench/gpu_speed.sh --fetch-wheels   # HERE (with network), once: the serving stack's wheels into
#                                            # bench/wheels (ignored); carry it: run(carry=["bench/wheels"])
#   bash bench/gpu_speed.sh                  # on the GPU machine; then the tables into bench/RESULTS.md
#   bash bench/gpu_speed.sh --cpu-smoke      # the same steps at tiny size on the CPU (tests/bench)
#
# The serving sweep needs fastapi/uvicorn/httpx/pydantic-settings/prometheus-client, which the GPU image
# may lack: the script installs them from bench/wheels (no index) into a temporary directory when they do
# not import, and skips the sweep (logged) when neither works. Everything else needs nothing beyond torch.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY="${PY:-python3}"
WHEELS="$ROOT/bench/wheels"
SERVING_PKGS=(fastapi uvicorn python-multipart pydantic pydantic-settings redis prometheus-client httpx)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  # The versions this checkout is tested with, for the GPU image's Python (3.12, x86_64 manylinux).
  mapfile -t pins < <("$PY" - "${SERVING_PKGS[@]}" <<'PYEOF'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
PYEOF
  )
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  exec "$PY" -m pip download --quiet --dest "$WHEELS" --only-binary=:all: --implementation cp \
    --python-version "${GPU_PYTHON_VERSION:-3.12}" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 "${pins[@]}"
fi

SMOKE=0
[[ "${1:-}" == "--cpu-smoke" || "${GPU_SPEED_CPU_SMOKE:-0}" == "1" ]] && SMOKE=1
export PYTHONPATH="$ROOT" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
LOG="$OUT/gpu_speed.log"
: >"$LOG"
DEADLINE=$(($(date +%s) + ${GPU_SPEED_BUDGET_S:-530}))
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning)

if ((SMOKE)); then
  SPEED=(--preset tiny --device cpu --sizes 64:3,32:3 --profile-steps 1)
  SWEEP=(--preset tiny --device cpu --sizes 64:3 --batch 1,2 --sweep-jobs 2)
  FUSED=(--smoke)
else
  SPEED=(--sizes 1024:50,512:20 --profile-steps 2)
  SWEEP=(--preset bagel-7b --device cuda --sizes 512:20,1024:10 --batch 1,4,8)
  FUSED=()
fi

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || echo "no nvidia-smi"
  date -u
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "triton: not importable"
  git -C "$ROOT" log -1 --format='commit %H %s' 2>/dev/null || true; } 2>&1 | tee "$OUT/conditions.txt"

# step NAME CAP_S CMD...: run CMD under min(CAP_S, time left), log its exit status and wall time.
step() {
  local name=$1 cap=$2 left
  shift 2
  left=$((DEADLINE - $(date +%s)))
  if ((left < 20)); then
    echo "== $name: skipped, ${left}s left" | tee -a "$LOG"
    return
  fi
  ((cap > left)) && cap=$left
  echo "== $name (cap ${cap}s)" | tee -a "$LOG"
  local t0=$SECONDS
  timeout "$cap" "$@" 2>&1 | tee -a "$LOG"
  echo "== $name: rc=${PIPESTATUS[0]} in $((SECONDS - t0))s" | tee -a "$LOG"
}

# The serving stack: importable as is, or from the carried wheels (no index), or the sweep is skipped.
serving_ready() {
  "$PY" -c "import fastapi, uvicorn, httpx, pydantic_settings, prometheus_client, multipart" 2>/dev/null
}
if ! serving_ready && [[ -d "$WHEELS" ]]; then
  SITE=$(mktemp -d)
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --target "$SITE" "${SERVING_PKGS[@]}" 2>&1 \
    | tail -3 | tee -a "$LOG"
  export PYTHONPATH="$ROOT:$SITE"
fi

# 1. Every mode side by side: stock / eager / exact / fast, 1024^2 x 50 and 512^2 x 20, random bf16 weights.
step speed 270 "$PY" -m bench.speed "${SPEED[@]}" --out "$OUT/speed.json"
# 2. The exact mode on the GPU: fused kernels vs float64 goldens, CUDA-graph replay == eager, fp32 parity.
gpu_tests() {
  "${PYTEST[@]}" tests/kernels/test_fused_gpu.py tests/engine/test_step_graphs_gpu.py &&
    RVR_TEST_DEVICE=cuda "${PYTEST[@]}" tests/engine/test_parity.py
}
((SMOKE)) && gpu_tests() { "${PYTEST[@]}" tests/kernels/test_fused_gpu.py tests/engine/test_step_graphs_gpu.py; }
step gpu-tests 90 bash -c "$(declare -f gpu_tests); PYTEST=(${PYTEST[*]}); gpu_tests" | tee "$OUT/gpu_tests.log"
# 3. Serving throughput through the real worker (in-process queue, HTTP + SSE), max_batch_jobs 1, 4, 8.
if serving_ready; then
  step serving 160 "$PY" -m server.bench --sweep "${SWEEP[@]}" --out "$OUT/serving.json"
else
  echo "== serving: skipped, the server stack does not import (run --fetch-wheels here and carry bench/wheels)" \
    | tee -a "$LOG"
fi
# 4. The fused elementwise kernels against the PyTorch formulas and torch.compile, at the step's row count.
step fused-bench 60 "$PY" -m kernels.fused_bench "${FUSED[@]}" --out "$OUT/fused_bench.json"
echo "== done, $((DEADLINE - $(date +%s)))s of the budget left" | tee -a "$LOG"
