#!/usr/bin/env bash
# The main job on the embedded default model: see `venom-hf demo --help`.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
exec "$VENV_PY" -m venom_hf.cli demo "$@"
