#!/usr/bin/env bash
# Session 5, call 2: the v3.3 prefill configs (TMA bulk-copy gathers, 8 warps, 4 stages). Correctness first
# (GPU tests of every kt config + the sanitizer), then the prefill sweep of every kt config (same run's cuBLAS).
source "$(dirname "$0")/gpu_common.sh"
timeout 170 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py -k kt 2>&1 | tail -5
timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
  > /tmp/sanitizer.txt 2>&1; echo "sanitizer rc=$?"; grep -E "kt64x256|kt128x128b|kt64x128k2b|ERROR SUMMARY|FAIL" /tmp/sanitizer.txt | tail -12
timeout 260 python3 benchmarks/spmm.py --out /tmp/sweep --sweep --sweep-set prefill --sweep-only --sweep-configs kt \
  > /tmp/sweep.log 2>&1
echo "sweep rc=$?"; cp /tmp/sweep/sweep.json "$OUT/sweep_kt33.json"; cp /tmp/sweep.log "$OUT/sweep_kt33.log"
grep -E "^sweep" /tmp/sweep.log | python3 scripts/sweep_best.py
