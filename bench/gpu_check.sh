#!/usr/bin/env bash
# Every GPU check in one command, for a lent H100/H200, inside one time budget (GPU_CHECK_BUDGET_S, default
# 540 s: one device call may run 600 s). Steps run most valuable first; each gets min(its cap, what is
# left), so a slow step costs the later ones, never the whole run. Runs with the machine's own python3
# (torch + triton + safetensors + tokenizers + pillow + pyarrow are there); no install needed.
# Results land in $OUT (default bench/out): conditions.txt, gpu_check.log, train_cuda.log and a JSON per
# benchmark (6 files; the device returns at most 8).
#
#   bash bench/gpu_check.sh            # then copy the figures into bench/RESULTS.md with card and date
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/out}"
PY="${PY:-python3}"
mkdir -p "$OUT"
LOG="$OUT/gpu_check.log"
DEADLINE=$(($(date +%s) + ${GPU_CHECK_BUDGET_S:-540}))
# The image's torch may warn about APIs the pinned CPU torch does not; warnings stay warnings here.
PYTEST=("$PY" -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning)

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u;
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  2>&1 | tee "$OUT/conditions.txt"

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

# 1. bf16/fp16 numerics of the compiled kernel on random layouts and the RvR shapes.
step kernel-tests 150 "${PYTEST[@]}" tests/kernels/test_kernels_gpu.py
# 2. Attention on the anchor shapes: kernel vs SDPA per branch, SDPA dense mask, FlexAttention.
step kernel-bench 150 "$PY" -m kernels.bench --out "$OUT/kernels_bench.json"
# 3. One 1024^2 RvR refine at BAGEL-7B-MoT shapes (random bf16 weights), with and without the kernel.
step engine-kernel 110 "$PY" bench/engine_refine.py --attention kernel --profile --out "$OUT/engine_kernel.json"
step engine-reference 90 "$PY" bench/engine_refine.py --attention reference --steps 20 \
  --out "$OUT/engine_reference.json"
# 4. Engine parity in float32 (TF32 off) on the GPU against the float64 CPU reference.
RVR_TEST_DEVICE=cuda step engine-parity 60 "${PYTEST[@]}" tests/engine/test_parity.py
# 5. The trainer on CUDA (bf16 autocast): the bundled model on a smoke-profile world, two batch sizes.
train_cuda() {
  local tmp
  tmp=$(mktemp -d)
  "$PY" -m training.runs --out "$tmp" --profile smoke --stages data || return
  for rows in 1200 12000; do
    "$PY" -m training.trainer --model engine/assets/demo --data-root "$tmp/data" \
      --rvr "$tmp/data/rvr/json/parquet_info.json" --t2i "$tmp/data/t2i" --mixture rvr=1,t2i=1 \
      --steps 200 --max-rows "$rows" --save-every 100000 --init-weights rvr --weights-name rvr \
      --device cuda --bf16 --out "$tmp/rvr_$rows" 2>&1 | tr '\r' '\n' | grep -E '^(100%| 50%)' | tail -3 \
      || return
  done
}
step train-cuda 60 bash -c "$(declare -f train_cuda); PY=$PY train_cuda" | tee "$OUT/train_cuda.log"
echo "== done, $((DEADLINE - $(date +%s)))s of the budget left" | tee -a "$LOG"
