#!/usr/bin/env bash
# One GPU call after the v5 decode kernel: the GPU tests (kernel, fused projections, modules, HF round trip),
# compute-sanitizer memcheck, the fp16 SpMM table (all shapes), the bf16 table (Llama-7B shapes), and the
# Llama-7B-shaped model benchmark (eager + torch.compile, graph-captured decode steps), all on one card.
# Flags: TESTS=0 SANITIZE=0 BF16=0 NCU=0 skip parts; SWEEP=tall8|decode runs that decode sweep first.
source "$(dirname "$0")/gpu_common.sh"
if [[ -n ${SWEEP:-} ]]; then
  timeout 200 python3 benchmarks/spmm.py --out /tmp/sweep --sweep --sweep-set "$SWEEP" --sweep-only \
    --sweep-configs ${SWEEP_CONFIGS:-ring,stream} > /tmp/sweep.log 2>&1
  echo "sweep rc=$?"; cp /tmp/sweep/sweep.json "$OUT/sweep_$SWEEP.json"; grep -E "^sweep" /tmp/sweep.log | python3 scripts/sweep_best.py
fi
[[ ${TESTS:-1} == 1 ]] && timeout ${TEST_TIMEOUT:-260} python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py tests/test_fused_projections.py \
    tests/test_modules.py tests/test_hf_roundtrip.py 2>&1 | tail -${TEST_TAIL:-5}
if [[ ${SANITIZE:-1} == 1 ]] && command -v compute-sanitizer >/dev/null; then
  timeout 150 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
    > /tmp/sanitizer.txt 2>&1
  echo "compute-sanitizer rc=$? $(grep -c ' ok$' /tmp/sanitizer.txt) ok, $(grep -c FAIL /tmp/sanitizer.txt) failed"
  grep "ERROR SUMMARY" /tmp/sanitizer.txt
fi
timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/spmm.py --dtype fp16 --out "$OUT/fp16" > /tmp/fp16.log 2>&1
echo "fp16 table rc=$?"; grep -E "took|failed|Error" /tmp/fp16.log | head
[[ ${BF16:-1} == 1 ]] && timeout 100 python3 benchmarks/spmm.py --dtype bf16 --shapes llama7b --tokens 1,16,2048,8192 --out /tmp/bf16 > /tmp/bf16.log 2>&1
[[ ${BF16:-1} == 1 ]] && { echo "bf16 table rc=$?"; cp /tmp/bf16/spmm.json "$OUT/spmm_bf16.json"; }
timeout ${MODELS_TIMEOUT:-330} python3 benchmarks/models.py --models llama7b \
    --formats ${MODEL_FORMATS:-dense 2:4 64:2:8 64:2:8+fused 64:2:16 64:2:16+fused} --compile --decode-batches 1 8 --out "$OUT/models" --plot \
    2>&1 | grep -v -E "it/s|Loading weights|UserWarning|return cls|warnings.warn|^\{" | tee /tmp/models.log
if [[ ${NCU:-1} == 1 ]] && command -v ncu >/dev/null; then
  timeout 120 ncu --clock-control none -k regex:spatha_spmm_ring --launch-skip 3 --launch-count 1 --section SpeedOfLight \
    --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy --section LaunchStats \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum,lts__t_sector_hit_rate.pct" \
    python3 scripts/ncu_profile.py ring > "$OUT/ncu_ring.txt" 2>&1
  echo "ncu ring rc=$?"; grep -v "^==PROF==" "$OUT/ncu_ring.txt" | grep -E "Throughput|Duration|Warp Cycles|Issued Ipc|Eligible Warps|Achieved Occ|Hit Rate|Registers Per|stalled|dram__bytes|Block Limit" | grep -v -E " 0(\.0+)?$" | head -50
fi
