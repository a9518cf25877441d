#!/usr/bin/env bash
# Prints the CMake arguments for llama.cpp on this machine; the set-up and the
# benchmarks' llama-bench build both use them, so both builds match.
#   RPC backend: always (multi-machine inference needs it).
#   CUDA: when nvcc and an NVIDIA GPU are both present (compiling CUDA kernels for a
#         machine with no GPU costs an hour and gives nothing). WORKBENCH_CUDA=1/0 overrides.
#   Portable (WORKBENCH_PORTABLE=1): no -march=native, for images built on one machine
#         and run on others (Binder).
#   AMX: off. llama.cpp's AMX matmul path (which -march=native picks on Xeons with AMX)
#         crashes on multi-token batches of the default model with this llama.cpp.
set -euo pipefail
want_cuda=${WORKBENCH_CUDA:-auto}
if [ "$want_cuda" = auto ]; then
    want_cuda=0
    if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 \
        && nvidia-smi -L >/dev/null 2>&1; then
        want_cuda=1
    fi
fi
args="-DGGML_RPC=on"
[ "$want_cuda" = 1 ] && args="$args -DGGML_CUDA=on"
[ "${WORKBENCH_PORTABLE:-0}" = 1 ] && args="$args -DGGML_NATIVE=off"
if [ "$(uname -m)" = x86_64 ]; then
    args="$args -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
echo "$args"
