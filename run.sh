#!/usr/bin/env bash
# One command to run the app on the embedded offline default: bash run.sh  (then open http://127.0.0.1:7860)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
bash scripts/setup.sh
exec .venv/bin/python app.py "$@"
