#!/usr/bin/env bash
# One GPU call: fuse_projections (q|k|v, gate|up in one SpMM) on the Llama-7B-shaped stack, same run as
# dense / cuSPARSELt 2:4 / unfused V:N:M, then the fused-projection tests (incl. CUDA-graph capture).
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export VENOM_HF_CACHE=/tmp/venom_cache OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${MODELS_TIMEOUT:-280} python3 benchmarks/models.py --models llama7b \
    --formats dense 2:4 64:2:8 64:2:8+fused 64:2:16 64:2:16+fused --out "$OUT" --plot 2>&1 | grep -v -E "it/s|Loading weights"
timeout ${TEST_TIMEOUT:-100} python3 -m pytest -q -p no:cacheprovider tests/test_fused_projections.py tests/test_modules.py tests/test_hf_roundtrip.py 2>&1 | tail -5
