#!/usr/bin/env bash
# Issue 6's GPU experiments, one mode per device call (each call carries at most 64 MiB):
#   MODE=bbc     carry .assets/bbc (MiniLM fp16 + the split): BBC News, low-budget regime over 3 seeds, and the
#                KD regime of docs/results.md for two more seeds at 64:2:16
#   MODE=stage   carry nothing extra: copies .assets/smol_a.part (first half of the SmolLM2 GGUF) to /tmp/stage
#   MODE=austen  carry .assets/smolb and .assets/austen.json.gz, on the same warm machine right after `stage`:
#                SmolLM2-135M on Jane Austen at 64:2:8 (dense, one-shot, gradual with KD)
source "$(dirname "$0")/gpu_common.sh"
case "${MODE:?MODE=bbc|stage|austen}" in
bbc)
  timeout 310 python3 experiments/bbc_news.py --assets .assets/bbc --out "$OUT/bbc_low" --dense-epochs 3 \
      --prune-epochs 3 --prune-end 0.5 --no-kd --specs 64:2:8 64:2:16 --seeds 0 1 2 2>&1 | grep -v -E "it/s|Loading weights"
  timeout 200 python3 experiments/bbc_news.py --assets .assets/bbc --out "$OUT/bbc_kd" --dense-epochs 3 \
      --prune-epochs 8 --specs 64:2:16 --seeds 1 2 2>&1 | grep -v -E "it/s|Loading weights"
  ;;
stage)
  mkdir -p /tmp/stage && cp .assets/smol_a.part /tmp/stage/ && ls -la /tmp/stage ;;
austen)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/gguf-*.whl || exit 1
  export PYTHONPATH=/tmp/site:src
  mkdir -p /tmp/smol && cat /tmp/stage/smol_a.part .assets/smolb/smol_b.part > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
  python3 -c "from venom_hf.assets import dequantize_gguf as d; d('/tmp/smol', 'SmolLM2-135M-Instruct.Q4_1.gguf', '/tmp/smol_hf')" 2>&1 | tail -2
  timeout ${AUSTEN_TIMEOUT:-500} python3 experiments/austen_lm.py --model /tmp/smol_hf --texts .assets/austen.json.gz \
      --out "$OUT/austen" --seq 512 --bs 8 --steps ${AUSTEN_STEPS:-800} --lr 1e-4 --calib 64 --num-grads 32 --kd \
      --runs dense dense-ft oneshot-magnitude oneshot-obs gradual-magnitude gradual-obs 2>&1 | grep -v -E "it/s|Loading weights"
  ;;
esac
ls -la "$OUT"/*
