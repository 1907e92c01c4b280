#!/usr/bin/env bash
# The one script run on the GPU machine per call: build (NVRTC) + tests + sanitizer + benchmark.
#   MODE=smoke|test|bench|all   (default all)   BENCH_ARGS="..." extra args to benchmarks/spmm.py
set -u
cd "$(dirname "$0")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 VENOM_HF_CACHE=${VENOM_HF_CACHE:-/tmp/venom_cache}
OUT=${OUT:-out}; mkdir -p "$OUT"
MODE=${MODE:-all}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader
python3 -c "import torch, cuda.bindings, sys; from cuda.bindings import nvrtc; print('torch', torch.__version__, 'nvrtc', nvrtc.nvrtcVersion()[1:], 'py', sys.version.split()[0])"
t0=$(date +%s)
python3 - <<'PY'
# Build every shipped instance (NVRTC, no CUDA context in the parent: forked workers compile in
# parallel into the disk cache), then load each module on the GPU.
import os, subprocess, time
from concurrent.futures import ProcessPoolExecutor
from itertools import repeat
t = time.time()
from venom_hf.kernels import nvrtc, configs
cc = subprocess.run(["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"], capture_output=True, text=True).stdout.split()[0]
arch = "sm_" + cc.replace(".", "")
jobs = []
for bf16 in (False, True):
    for c in configs.CONFIGS:
        for kw in c.kws:
            if c.kernel in ("stream", "ring"):
                jobs.append([c.expr(bf16, kw)])
                continue
            jobs.append([c.expr(bf16, kw), configs.reduce_expr(bf16)] + ([configs.TRANSPOSE_EXPR] if c.kernel == "kt" else []))
jobs.append([configs.TRANSPOSE_EXPR])
with ProcessPoolExecutor(min(16, os.cpu_count() or 4)) as ex:
    list(ex.map(nvrtc.cached_cubin, jobs, repeat(arch)))
print(f"compiled {len(jobs)} modules for {arch} in {time.time()-t:.1f}s", flush=True)
from venom_hf.kernels import ops
for ex_ in jobs:
    nvrtc.get_module(ex_, arch, 0)
print(f"built + loaded all instances for {arch} in {time.time()-t:.1f}s")
PY
if [[ $MODE == smoke || $MODE == all || $MODE == test ]]; then
  python3 scripts/spmm_sanitize.py 2>&1 | tail -20
fi
if [[ $MODE == all || $MODE == test ]]; then
  timeout 400 python3 -m pytest -q tests/test_kernel_gpu.py -p no:cacheprovider > "$OUT/pytest.txt" 2>&1; echo "pytest rc=$?"
  grep -E "passed|failed|FAILED|Error" "$OUT/pytest.txt" | tail -15
  echo "pytest took $(( $(date +%s) - t0 )) s"
  if command -v compute-sanitizer >/dev/null; then
    timeout 200 compute-sanitizer --tool memcheck --report-api-errors no --print-limit 5 python3 scripts/spmm_sanitize.py > "$OUT/sanitizer.txt" 2>&1
    echo "compute-sanitizer rc=$?"; tail -4 "$OUT/sanitizer.txt"
  else
    echo "compute-sanitizer: not found"
  fi
fi
if [[ $MODE == bench || $MODE == all ]]; then
  timeout ${BENCH_TIMEOUT:-500} python3 benchmarks/spmm.py --out "$OUT" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1; echo "bench rc=$?"
  grep -E "^sweep|took" "$OUT/bench.log" | tail -60
fi
echo "total $(( $(date +%s) - t0 )) s"
