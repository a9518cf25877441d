#!/usr/bin/env bash
# Creates .venv and installs the workbench with everything it needs.
# llama-cpp-python is compiled from source with llama.cpp's RPC backend, and with
# CUDA when both nvcc and an NVIDIA GPU are present (compiling CUDA kernels for a
# machine with no GPU costs an hour and gives nothing). WORKBENCH_CUDA=1/0 overrides.
# The compiled wheel is cached per build variant, so a second set-up takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
python=${PYTHON:-python3}

want_cuda=${WORKBENCH_CUDA:-auto}
if [ "$want_cuda" = auto ]; then
    want_cuda=0
    if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 \
        && nvidia-smi -L >/dev/null 2>&1; then
        want_cuda=1
    fi
fi
cmake_args="-DGGML_RPC=on"
# llama.cpp's AMX matmul path (picked by -march=native on Xeons with AMX) crashes on
# multi-token batches of this model with this llama.cpp; build without it.
if [ "$(uname -m)" = x86_64 ]; then
    cmake_args="$cmake_args -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
[ "$want_cuda" = 1 ] && cmake_args="$cmake_args -DGGML_CUDA=on"

llama_pin=$(grep -o 'llama-cpp-python==[0-9.]*' pyproject.toml)
variant=$(printf '%s %s %s' "$llama_pin" "$cmake_args" "$("$python" -c 'import sys,platform;print(sys.version_info[:2],platform.machine())')" | sha256sum | cut -c1-12)
wheels=${XDG_CACHE_HOME:-$HOME/.cache}/workbench/wheels/$variant

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"

if ! ls "$wheels"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    echo "Compiling $llama_pin with CMAKE_ARGS='$cmake_args' (a few minutes, once)..."
    mkdir -p "$wheels.tmp"
    CMAKE_ARGS="$cmake_args" "$venv/bin/pip" wheel --no-deps --no-cache-dir \
        --no-binary llama-cpp-python "$llama_pin" -w "$wheels.tmp"
    rm -rf "$wheels" && mv "$wheels.tmp" "$wheels"
fi

"$venv/bin/pip" install --find-links "$wheels" -e '.[test]'
"$venv/bin/python" -m workbench.models.default
