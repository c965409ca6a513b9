#!/usr/bin/env bash
# One command to run the tests: bash test.sh  (extra arguments go to pytest, e.g. bash test.sh -m "not e2e")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
# llama.cpp from upstream source, for the e2e tests that serve our files in llama-server (~30 min once per machine;
# cached under ~/.cache/steer_core/llama.cpp). A run without the e2e tests needs only its source, fetched on demand.
case "$*" in
  *"not e2e"*) ;;
  *) bash scripts/llama_cpp.sh >/dev/null ;;
esac
.venv/bin/python -m ruff check steer_core app.py tests scripts
exec .venv/bin/python -m pytest "$@"
