#!/usr/bin/env bash
# Final GPU call of a kernel change: build + kernel/module GPU tests + the full SpMM benchmark + the
# model-level benchmark (llama7b, bert-large), all on one machine.
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VENOM_HF_CACHE=${VENOM_HF_CACHE:-/tmp/venom_cache} OUT=${OUT:-out}
mkdir -p "$OUT"
MODE=smoke bash scripts/gpu_kernel.sh 2>&1 | tail -4
timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_kernel_gpu.py tests/test_modules.py > "$OUT/pytest.txt" 2>&1
echo "pytest rc=$?"; tail -2 "$OUT/pytest.txt"; grep FAILED "$OUT/pytest.txt" | head
timeout ${BENCH_TIMEOUT:-260} python3 benchmarks/spmm.py --out "$OUT" > "$OUT/bench.log" 2>&1; echo "bench rc=$?"; grep took "$OUT/bench.log"
timeout ${MODELS_TIMEOUT:-150} python3 benchmarks/models.py --models llama7b bert-large --out "$OUT" --plot 2>&1 | grep -v -E "it/s|Loading" | tail -30
