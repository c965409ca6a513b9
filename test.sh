#!/usr/bin/env bash
# One command to run the tests: bash test.sh  (extra arguments go to pytest, e.g. bash test.sh -m "not e2e")
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
.venv/bin/python -m ruff check steer_core app.py tests scripts
exec .venv/bin/python -m pytest "$@"
