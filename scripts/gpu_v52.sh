#!/usr/bin/env bash
# Session 5, call 3: v5.2 (the ring kernel's pre-gathered x in B-register order: one 16-byte load per k-step).
# Correctness first (decode-kernel GPU tests + the sanitizer, which include the sel configs); stop if they fail.
# Then the cold-weight decode sweep of the ring / stream configs (1 and 16 tokens) and 3-8 tokens on tall layers.
source "$(dirname "$0")/gpu_common.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py -k "stream or split" -x 2>&1 | tail -4
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "TESTS FAILED: stopping"; exit 1; }
timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
  > /tmp/sanitizer.txt 2>&1; echo "sanitizer rc=$?"; grep -E "sel|ERROR SUMMARY|FAIL" /tmp/sanitizer.txt | tail -6
for set in decode tall8; do
  timeout 150 python3 benchmarks/spmm.py --out /tmp/sweep_$set --sweep --sweep-set $set --sweep-only --cold \
    --sweep-configs ring,stream > /tmp/sweep_$set.log 2>&1
  echo "cold sweep $set rc=$?"; cp /tmp/sweep_$set/sweep.json "$OUT/sweep_cold_$set.json"
  grep -E "^sweep" /tmp/sweep_$set.log | python3 scripts/sweep_best.py
done
