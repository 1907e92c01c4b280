#!/usr/bin/env bash
# One GPU call for the v4 decode kernel: build + tests + sanitizer (gpu_kernel.sh MODE=test), the decode
# sweep, and Nsight Compute profiles of the kt prefill and stream decode kernels.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 VENOM_HF_CACHE=${VENOM_HF_CACHE:-/tmp/venom_cache} OUT=${OUT:-out}
mkdir -p "$OUT"
if [[ ${SKIP_TEST:-0} != 1 ]]; then MODE=test bash scripts/gpu_kernel.sh; fi
timeout ${SWEEP_TIMEOUT:-200} python3 benchmarks/spmm.py --out "$OUT" --sweep --sweep-set ${SWEEP_SET:-decode} --sweep-only > "$OUT/sweep.log" 2>&1
echo "sweep rc=$?"; grep -E "^sweep|card" "$OUT/sweep.log" | tail -120
if [[ ${NCU:-1} == 1 ]] && command -v ncu >/dev/null; then
  for k in kt stream; do
    regex=$([ $k = kt ] && echo spatha_spmm_kt || echo spatha_spmm_stream)
    sections="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats"
    timeout 150 ncu --clock-control none -k regex:$regex --launch-skip 3 --launch-count 1 $sections \
      --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
      python3 scripts/ncu_profile.py $k > "$OUT/ncu_$k.txt" 2>&1
    rc=$?
    if [[ $rc != 0 ]]; then
      timeout 150 ncu --clock-control none -k regex:$regex --launch-skip 3 --launch-count 1 $sections \
        python3 scripts/ncu_profile.py $k > "$OUT/ncu_$k.txt" 2>&1; rc=$?
    fi
    echo "ncu $k rc=$rc"; grep -v "^==PROF==" "$OUT/ncu_$k.txt" | grep -E "Throughput|Duration|Warp Cycles|Issued Ipc|Eligible Warps|Achieved Occ|Hit Rate|Registers Per|stalled" | grep -v -E " 0(\.0+)?$" | head -60
  done
fi
