#!/usr/bin/env bash
# Prepared for the next GPU call (not run yet): the Llama-7B-shaped decode step with torch.compile (inductor
# fuses the norms / RoPE / SiLU / residual kernels that cost dense and sparse columns alike) in a CUDA graph,
# next to the eager-module graph step, dense vs 64:2:8 (unfused and fused) vs 64:2:16, same run.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export VENOM_HF_CACHE=/tmp/venom_cache OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout ${MODELS_TIMEOUT:-540} python3 benchmarks/models.py --models llama7b --formats dense 64:2:8 64:2:8+fused 64:2:16 \
    --compile --decode-batches ${BATCHES:-1} --out "$OUT" --plot 2>&1 | grep -v -E "it/s|Loading weights|UserWarning|return cls"
