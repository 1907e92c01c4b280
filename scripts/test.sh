#!/usr/bin/env bash
# The test suite (CPU; GPU tests are marked and skip without CUDA). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
set +e
"$VENV_PY" -m pytest -q "$@"
rc=$?
# pytest exits 5 when it collected no tests (e.g. a filter matched nothing): not a failure here.
[ "$rc" -eq 5 ] && { echo "[venom_hf] pytest collected no tests"; rc=0; }
exit "$rc"
