#!/usr/bin/env bash
# Session 5, the last two GPU calls (two, to stay inside the 10-minute limit of one command):
#   PART=tests  the GPU tests (kernel, fused projections, modules, HF round trip), the sanitizer set, and the
#               Llama-7B-shaped model step (eager + torch.compile, graph-captured decode, b1 / b8) with the
#               dense and 2:4 baselines of the same run;
#   PART=table  the fp16 SpMM table with cold weights (every call streams its weights from HBM, as in a model).
source "$(dirname "$0")/gpu_common.sh"
if [[ ${PART:-tests} == tests ]]; then
  timeout 250 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py tests/test_fused_projections.py \
    tests/test_modules.py tests/test_hf_roundtrip.py > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$?"; tail -2 "$OUT/pytest.txt"; grep -E "^FAILED|Error" "$OUT/pytest.txt" | head
  timeout 90 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py \
    > /tmp/sanitizer.txt 2>&1
  echo "compute-sanitizer rc=$? $(grep -c ' ok$' /tmp/sanitizer.txt) ok, $(grep -c FAIL /tmp/sanitizer.txt) failed"
  grep "ERROR SUMMARY" /tmp/sanitizer.txt
  timeout 220 python3 benchmarks/models.py --models llama7b --formats dense 2:4 64:2:8+fused 64:2:16+fused --compile \
    --decode-batches 1 8 --out "$OUT/models" --plot 2>&1 | grep -E "^\| llama7b .*decode step"
else
  timeout 400 python3 benchmarks/spmm.py --dtype fp16 --cold --out "$OUT/fp16" > /tmp/fp16.log 2>&1
  echo "fp16 cold table rc=$?"; grep -E "took|failed|Error" /tmp/fp16.log | head -3; cp /tmp/fp16.log "$OUT/fp16.log"
fi
