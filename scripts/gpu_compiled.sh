#!/usr/bin/env bash
# Prepared for the next GPU call (not run yet): the Llama-7B-shaped decode step with torch.compile (inductor
# fuses the norms / RoPE / SiLU / residual kernels that cost dense and sparse columns alike) in a CUDA graph,
# next to the eager-module graph step, dense vs 64:2:8 (unfused and fused) vs 64:2:16, same run.
source "$(dirname "$0")/gpu_common.sh"
timeout ${MODELS_TIMEOUT:-540} python3 benchmarks/models.py --models llama7b --formats dense 64:2:8 64:2:8+fused 64:2:16 \
    --compile --decode-batches ${BATCHES:-1} --out "$OUT" --plot 2>&1 | grep -v -E "it/s|Loading weights|UserWarning|return cls"
