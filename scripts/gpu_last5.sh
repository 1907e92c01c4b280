#!/usr/bin/env bash
# Session 5, last GPU call on the final code: the GPU tests (kernel, fused projections, modules, HF round trip),
# then the fp16 SpMM table (all shapes) and the bf16 table (Llama-7B shapes), both with cold weights.
source "$(dirname "$0")/gpu_common.sh"
timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py tests/test_fused_projections.py \
  tests/test_modules.py tests/test_hf_roundtrip.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?"; tail -2 "$OUT/pytest.txt"; grep -E "^FAILED|Error" "$OUT/pytest.txt" | head
timeout 150 python3 benchmarks/spmm.py --dtype fp16 --cold --out "$OUT/fp16" > "$OUT/fp16.log" 2>&1; echo "fp16 cold table rc=$?"
timeout 100 python3 benchmarks/spmm.py --dtype bf16 --cold --shapes llama7b --tokens 1,16,2048,8192 --out "$OUT/bf16" \
  > /tmp/bf16.log 2>&1; echo "bf16 cold table rc=$?"
