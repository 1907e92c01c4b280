#!/usr/bin/env bash
# Prepared for the next GPU call (not run yet): the v5.1 tests, then the decode sweep and the fp16 table with cold weights
# (`--cold`: every call streams its weights from HBM, as in a model; run 10 found the warm-L2 sweep misleading
# at 3-8 tokens), to re-decide v4 vs v5 per shape; then the Llama-7B-shaped model step (the arbiter).
# First the untested v5.1 configs (ring_*sel): the decode-kernel GPU tests and the sanitizer set include them.
source "$(dirname "$0")/gpu_common.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py -k "stream or split" 2>&1 | tail -4
timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
  > /tmp/sanitizer.txt 2>&1; echo "sanitizer rc=$?"; grep -E "sel|ERROR SUMMARY|FAIL" /tmp/sanitizer.txt | tail -6
timeout 240 python3 benchmarks/spmm.py --out /tmp/sweep --sweep --sweep-set decode --sweep-only --cold \
  --sweep-configs ring,stream,decode16x8 > /tmp/sweep.log 2>&1
echo "cold sweep rc=$?"; cp /tmp/sweep/sweep.json "$OUT/sweep_cold.json"; grep -E "^sweep" /tmp/sweep.log | python3 scripts/sweep_best.py
timeout 300 python3 benchmarks/models.py --models llama7b --formats dense 64:2:8 64:2:8+fused 64:2:16+fused --compile \
  --decode-batches 1 8 --out "$OUT/models" 2>&1 | grep -E "^\| llama7b .*decode step"
