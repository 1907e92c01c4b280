#!/usr/bin/env bash
# Session 5: the v6 prefill kernel (kd: dense x^T tiles shared by several V-blocks, M <= 8). Correctness first
# (its GPU tests, every forced config, the sanitizer set); stop if they fail. Then the prefill sweep of the kd
# configs against the kt configs now dispatched (same run's cuBLAS), and an ncu profile of kd256x128.
source "$(dirname "$0")/gpu_common.sh"
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py -k "kd or every_config or prefill" -x 2>&1 | tail -4
[[ ${PIPESTATUS[0]} == 0 ]] || { echo "TESTS FAILED: stopping"; exit 1; }
timeout 120 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
  > /tmp/sanitizer.txt 2>&1; echo "sanitizer rc=$?"; grep -E "kd|ERROR SUMMARY|FAIL" /tmp/sanitizer.txt | tail -9
timeout 200 python3 benchmarks/spmm.py --out /tmp/sweep --sweep --sweep-set prefill --sweep-only \
  --sweep-configs kd,kt64x256,kt64x128k2,kt128x128,kt64x64 > /tmp/sweep.log 2>&1
echo "sweep rc=$?"; cp /tmp/sweep/sweep.json "$OUT/sweep_kd.json"; grep -E "^sweep" /tmp/sweep.log | python3 scripts/sweep_best.py
M="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,lts__t_bytes.sum.per_second,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum"
timeout 100 ncu --clock-control none -k regex:spatha_spmm_kd --launch-skip 3 --launch-count 1 --section SpeedOfLight \
  --section WarpStateStats --section Occupancy --metrics "$M" python3 scripts/ncu_profile.py kt kd256x128 \
  > "$OUT/ncu_kd256x128.txt" 2>&1; echo "ncu rc=$?"
grep -v "^==PROF==" "$OUT/ncu_kd256x128.txt" | grep -E "Throughput|Duration|Eligible|Achieved Occ|Registers Per|stalled_(wait|short|long|mio|barrier|math)|lts__|l1tex__" | grep -v -E " 0(\.0+)?$" | head -24
