#!/usr/bin/env bash
# One GPU call: the fused-projection / module / HF round-trip tests on the GPU, then fuse_projections
# (q|k|v, gate|up in one SpMM) on the Llama-7B-shaped stack in the same run as dense / cuSPARSELt 2:4 /
# unfused V:N:M, then the bf16 kernel benchmark on the Llama-7B shapes.
source "$(dirname "$0")/gpu_common.sh"
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider tests/test_fused_projections.py \
    tests/test_modules.py tests/test_hf_roundtrip.py 2>&1 | tail -4
timeout ${MODELS_TIMEOUT:-280} python3 benchmarks/models.py --models llama7b \
    --formats dense 2:4 64:2:8 64:2:8+fused 64:2:16 64:2:16+fused --out "$OUT" --plot 2>&1 \
    | grep -v -E "it/s|Loading weights|UserWarning|return cls"
timeout ${BENCH_TIMEOUT:-120} python3 benchmarks/spmm.py --dtype bf16 --shapes llama7b --tokens ${BENCH_TOKENS:-1,16,2048,8192} \
    --out "$OUT/bf16" 2>&1 | tail -40
