#!/usr/bin/env bash
# Session 5, experiment: the ring kernel reading the weight in stream order (ops.stream_tiles, config
# ring_n1r1selt, never dispatched). Correctness first (bitwise equal to ring_n1r1sel, split-K off / forced; the
# sanitizer set includes it); stop if it fails. Then 1-token cold-weight sweep: canonical vs stream order.
source "$(dirname "$0")/gpu_common.sh"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py -k "stream_tiles or split" -x 2>&1 | tail -3
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "TESTS FAILED: stopping"; exit 1; }
timeout 100 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
  > /tmp/sanitizer.txt 2>&1; echo "sanitizer rc=$?"; grep -E "selt|ERROR SUMMARY|FAIL" /tmp/sanitizer.txt | tail -5
timeout 100 python3 benchmarks/spmm.py --out /tmp/sweep --sweep --sweep-set decode --sweep-only --cold \
  --sweep-configs ring_n1r1sel > /tmp/sweep.log 2>&1
echo "sweep rc=$?"; cp /tmp/sweep/sweep.json "$OUT/sweep_tiles.json"; grep -E "^sweep" /tmp/sweep.log | grep -E "T=1 " | sed 's/ err.*//'
