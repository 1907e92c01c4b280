#!/usr/bin/env bash
# Issue 8 on a 2-GPU machine in one call (device kind nvidia-h100-x2), see docs/distributed.md:
#   a. tests/test_ddp.py's DDP worker with NCCL on cuda:0/cuda:1 vs one GPU (masks, zeros, final weights)
#   b. DDP training throughput with VNMPruningCallback (OBS) active: 1 GPU vs 2 GPUs (accelerate launch)
#   c. a packed 64:2:8 Llama-shaped model: one GPU vs device_map="auto" over both GPUs (logits, tokens, tok/s)
# Everything is built from configs (random weights, synthetic tokens): nothing is downloaded.
# Results: $OUT/{env.txt,ddp_check.json,train_g1.json,train_g2.json,split.json,summary.json,gpu_multi.log}.
# Each step has a timeout and all of them share one deadline (BUDGET_S seconds, default 400), so the
# script always reaches the summary; a failed step is reported and the next one still runs.
# Snapshot of HEAD to measure (before the device call; /.mg_head/ is in .gitignore):
#   rm -rf .mg_head && mkdir .mg_head && git archive HEAD src csrc | tar -x -C .mg_head && git rev-parse HEAD > .mg_head/COMMIT
# then: run(kind="nvidia-h100-x2", command="bash scripts/gpu_multi.sh", carry=[".mg_head"])
# Local dry run of the flow without a GPU (toy sizes, gloo, CPU):
#   DRY=1 OUT=/tmp/mg bash scripts/gpu_multi.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-out/multi_gpu}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_multi.log") 2>&1
BUDGET_S=${BUDGET_S:-400}
# NVLink multicast stays off (shared host; see the device notes), also in every child process
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# SNAP (default .mg_head): a snapshot of a commit's src/ and csrc/ (git archive; carried, git-ignored), so
# that uncommitted work in progress elsewhere in the tree (e.g. the kernel) does not change what is measured.
SNAP=${SNAP:-.mg_head}
if [ -d "$SNAP/src/venom_hf" ]; then SRC="$PWD/$SNAP/src"; else SRC="$PWD/src"; fi
export VENOM_HF_SRC="$SRC"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 VENOM_HF_CACHE=/tmp/venom_cache
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1
export TOKENIZERS_PARALLELISM=false TRANSFORMERS_VERBOSITY=warning
PY=${PY:-python3}
BACKEND=nccl; TOY=(); MP=bf16
if [ "${DRY:-0}" = 1 ]; then BACKEND=gloo; TOY=(--cpu --tiny); MP=no; fi
declare -A RC
STEPS=" ${STEPS:-ddp_check train split} "   # a subset reruns only those steps, e.g. STEPS=split
want() { [[ "$STEPS" == *" $1 "* ]]; }

left() { echo $(( BUDGET_S - SECONDS )); }
step() {  # step NAME CAP_SECONDS CMD...: run with timeout min(CAP, time left - 15 s reserve for the summary)
  local name=$1 cap=$2; shift 2
  local t=$(( $(left) - 15 )); [ "$t" -gt "$cap" ] && t=$cap
  if [ "$t" -lt 20 ]; then echo "=== $name: SKIPPED (only $(left) s of the budget left)"; RC[$name]=skipped; return; fi
  echo "=== $name (timeout ${t}s, t=${SECONDS}s): $*"
  timeout --kill-after=10 "$t" "$@"
  local rc=$?
  RC[$name]=$rc
  echo "=== $name: rc=$rc (t=${SECONDS}s)"
}

{
  date -u
  nvidia-smi --query-gpu=index,name,driver_version,memory.total,clocks.max.sm --format=csv
  nvidia-smi topo -m
  "$PY" -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', '.'.join(map(str, torch.cuda.nccl.version())), 'transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'gpus', torch.cuda.device_count())"
  env | grep -E '^(NCCL|TORCH_SYMM|NVSHMEM)' | sort
  echo "venom_hf source: $SRC ($(cat "$SNAP/COMMIT" 2>/dev/null || echo working tree))"
  "$PY" -c "import venom_hf, os; print('venom_hf from', os.path.dirname(venom_hf.__file__))"
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

want ddp_check && step ddp_check 120 "$PY" benchmarks/multi_gpu.py ddp-check --out "$OUT" --timeout 100 --backend "$BACKEND"
TRAIN_ARGS=(--out "$OUT" --steps 60 --prune-steps 20 40 --num-grads 8 --batch 32 --seq 128 --dtype bf16 ${TOY[@]+"${TOY[@]}"})
want train && step train_g1 100 env CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/multi_gpu.py train --tag g1 "${TRAIN_ARGS[@]}"
LAUNCHER="accelerate launch --multi_gpu --num_processes 2"
want train && step train_g2 110 "$PY" -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
  --mixed_precision "$MP" --dynamo_backend no --main_process_port 29531 \
  benchmarks/multi_gpu.py train --tag g2 "${TRAIN_ARGS[@]}"
if want train && [ "${RC[train_g2]}" != 0 ] && [ ! -f "$OUT/train_g2.json" ]; then  # accelerate launch failed: torchrun
  LAUNCHER="torchrun --nproc-per-node 2"
  step train_g2_torchrun 100 "$PY" -m torch.distributed.run --standalone --nproc-per-node 2 \
    benchmarks/multi_gpu.py train --tag g2 "${TRAIN_ARGS[@]}"
fi
want split && step split 120 "$PY" benchmarks/multi_gpu.py split --out "$OUT" --hidden 1024 --intermediate 2816 --layers 8 ${TOY[@]+"${TOY[@]}"}

echo "=== summary (t=${SECONDS}s)"
for k in "${!RC[@]}"; do echo "step $k: rc=${RC[$k]}"; done
timeout 30 "$PY" benchmarks/multi_gpu.py summary --out "$OUT" --launcher "$LAUNCHER"
