#!/usr/bin/env bash
# Session 5, last GPU call: the bf16 SpMM table on the Llama-7B shapes (cold weights), then two Nsight Compute
# profiles: the v5.2 decode kernel (ring_n1r1sel, fused q|k|v 12288x4096, 1 token) and the prefill kernel
# (kt64x256, 4096x4096, 2048 tokens) with L2 and shared-memory throughput metrics.
source "$(dirname "$0")/gpu_common.sh"
timeout 150 python3 benchmarks/spmm.py --dtype bf16 --cold --shapes llama7b --tokens 1,16,2048,8192 --out "$OUT/bf16" \
  > /tmp/bf16.log 2>&1; echo "bf16 cold table rc=$?"
M="regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum,lts__t_sector_hit_rate.pct,lts__t_bytes.sum.per_second,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__throughput.avg.pct_of_peak_sustained_active"
S="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats"
timeout 150 ncu --clock-control none -k regex:spatha_spmm_ring --launch-skip 3 --launch-count 1 $S --metrics "$M" \
  python3 scripts/ncu_profile.py ring ring_n1r1sel > "$OUT/ncu_ring_n1r1sel_v52.txt" 2>&1; echo "ncu ring rc=$?"
timeout 150 ncu --clock-control none -k regex:spatha_spmm_kt --launch-skip 3 --launch-count 1 $S --metrics "$M" \
  python3 scripts/ncu_profile.py kt kt64x256 > "$OUT/ncu_kt64x256_v32.txt" 2>&1; echo "ncu kt rc=$?"
for f in "$OUT"/ncu_*.txt; do echo "== $f"; grep -v "^==PROF==" "$f" | grep -E "Throughput|Duration|Issued Ipc|Eligible Warps|Achieved Occ|Hit Rate|Registers Per|stalled_(wait|short|long|mio|barrier|math|lg|not_sel)|dram__bytes|lts__t_bytes|lts__throughput|l1tex__|Block Limit" | grep -v -E " 0(\.0+)?$" | head -40; done
