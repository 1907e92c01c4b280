# Sourced by the scripts/gpu_*.sh device-call scripts: repo root, offline HF, unbuffered output, kernel
# cache in /tmp, $OUT (created), and the card's name first in the log.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH=src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export VENOM_HF_CACHE=/tmp/venom_cache OUT=${OUT:-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
