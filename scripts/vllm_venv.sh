#!/usr/bin/env bash
# A separate environment with vLLM (it pins its own torch and transformers), for the test that loads our adapters
# with vLLM's own LoRA loader (scripts/vllm_load.py). Made once per machine under the project's cache dir (~9 GB: vLLM
# brings CUDA libraries even where only its loader is used); prints the environment's folder.
#   bash scripts/vllm_venv.sh
set -euo pipefail
VLLM_VERSION=0.33.0
ROOT="${STEER_CORE_CACHE:-$HOME/.cache/steer_core}/vllm-${VLLM_VERSION}"
if [[ -x "$ROOT/bin/python" && -f "$ROOT/.complete" ]]; then
    echo "$ROOT"
    exit 0
fi
rm -rf "$ROOT"
python3 -m venv "$ROOT"
"$ROOT/bin/python" -m pip install --quiet "vllm==${VLLM_VERSION}" >&2
touch "$ROOT/.complete"
echo "$ROOT"
