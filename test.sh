#!/usr/bin/env bash
# One command to run the tests: bash test.sh  (extra arguments go to pytest, e.g. bash test.sh -m "not e2e")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
# The real engines for the e2e tests, made once per machine under ~/.cache/steer_core: llama.cpp built from upstream
# source (~10-30 min), vLLM in its own environment (~5 min, ~9 GB). A run without the e2e tests needs neither (only
# llama.cpp's source, fetched on demand).
case "$*" in
  *"not e2e"*) ;;
  *) bash scripts/llama_cpp.sh >/dev/null && bash scripts/vllm_venv.sh >/dev/null ;;
esac
.venv/bin/python -m ruff check steer_core app.py tests scripts
.venv/bin/python -m ruff format --check steer_core app.py tests scripts
.venv/bin/python -m mypy  # steer_core, as configured in pyproject.toml
exec .venv/bin/python -m pytest "$@"
