#!/usr/bin/env bash
# Every GPU check in one command, for a lent H100/H200 (about 8 minutes; the device budget is 15).
# Runs with the machine's own python3 (torch + triton + safetensors + tokenizers + pillow are there);
# no install needed. Results land in $OUT (default bench/out): conditions.txt, one gpu_check.log and a
# JSON per benchmark (5 files; the device returns at most 8).
#
#   bash bench/gpu_check.sh            # then copy the figures into bench/RESULTS.md with card and date
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; date -u;
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"; } \
  | tee "$OUT/conditions.txt"

# 1. bf16/fp16 numerics of the compiled kernel, and engine parity in float32 (TF32 off) on the GPU.
#    (The image's torch may warn about APIs the pinned CPU torch does not; warnings stay warnings here.)
timeout 240 python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning tests/kernels/test_kernels_gpu.py 2>&1 | tee -a "$OUT/gpu_check.log"
RVR_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider -W ignore::UserWarning -W ignore::FutureWarning tests/engine/test_parity.py 2>&1 \
  | tee -a "$OUT/gpu_check.log"

# 2. Attention on the anchor shapes: kernel vs SDPA per branch, SDPA dense mask, FlexAttention.
timeout 300 python3 -m kernels.bench --out "$OUT/kernels_bench.json" 2>&1 | tee -a "$OUT/gpu_check.log"

# 3. One 1024^2 RvR refine at BAGEL-7B-MoT shapes (random bf16 weights), with and without the kernel.
timeout 300 python3 bench/engine_refine.py --attention kernel --profile --out "$OUT/engine_kernel.json" 2>&1 \
  | tee -a "$OUT/gpu_check.log"
timeout 300 python3 bench/engine_refine.py --attention reference --out "$OUT/engine_reference.json" 2>&1 \
  | tee -a "$OUT/gpu_check.log"
