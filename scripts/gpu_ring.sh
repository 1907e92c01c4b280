#!/usr/bin/env bash
# One GPU call for the v5 decode kernel (spatha_spmm_ring): the kernel tests (every config incl. v4 and v5,
# split-K on and off), compute-sanitizer memcheck of the small-call set, then the decode sweep (every decode
# config and split knob, cuBLAS in the same run).
source "$(dirname "$0")/gpu_common.sh"
timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py 2>&1 | tail -${TEST_TAIL:-6}
if [[ ${SANITIZE:-1} == 1 ]] && command -v compute-sanitizer >/dev/null; then
  timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
    > "$OUT/sanitizer.txt" 2>&1
  echo "compute-sanitizer rc=$?"; grep -E "ring|ERROR SUMMARY|FAIL" "$OUT/sanitizer.txt" | tail -14
fi
timeout ${SWEEP_TIMEOUT:-240} python3 benchmarks/spmm.py --out "$OUT" --sweep --sweep-set decode --sweep-only \
  > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"; grep -E "^sweep" "$OUT/sweep.log" | python3 scripts/sweep_best.py
