#!/usr/bin/env bash
# Prints the CMake arguments for llama.cpp on this machine; the set-up, the benchmarks'
# llama-bench build and the service's GPU image use them, so the builds match.
#   RPC backend: always (multi-machine inference needs it).
#   GPU backend, WORKBENCH_GPU_BACKEND=auto|cuda|metal|vulkan|rocm|none (default auto):
#     auto:   Metal on macOS (Apple Silicon); CUDA on Linux when nvcc and an NVIDIA GPU are
#             both present (compiling CUDA kernels for a machine with no GPU costs an hour
#             and gives nothing); else none.
#     vulkan: any Vulkan GPU (needs the Vulkan SDK: glslc and the loader's headers).
#     rocm:   AMD GPUs through HIP (needs ROCm; WORKBENCH_ROCM_TARGETS, e.g. gfx1100,
#             narrows the kernels compiled).
#   WORKBENCH_CUDA=1/0 (older spelling) forces CUDA on or off.
#   Portable (WORKBENCH_PORTABLE=1): no -march=native, for images built on one machine
#         and run on others (Binder, Docker).
#   AMX: off. llama.cpp's AMX matmul path (which -march=native picks on Xeons with AMX)
#         crashes on multi-token batches of the default model with this llama.cpp.
set -euo pipefail
os=$(uname -s)
arch=$(uname -m)
backend=${WORKBENCH_GPU_BACKEND:-auto}
case ${WORKBENCH_CUDA:-} in
    1) backend=cuda ;;
    0) [ "$backend" = cuda ] || [ "$backend" = auto ] && backend=none ;;
esac
if [ "$backend" = auto ]; then
    backend=none
    if [ "$os" = Darwin ]; then
        [ "$arch" = arm64 ] && backend=metal
    elif command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 \
        && nvidia-smi -L >/dev/null 2>&1; then
        backend=cuda
    fi
fi
args="-DGGML_RPC=on"
case $backend in
    cuda) args="$args -DGGML_CUDA=on" ;;
    metal) args="$args -DGGML_METAL=on" ;;
    vulkan) args="$args -DGGML_VULKAN=on" ;;
    rocm)
        args="$args -DGGML_HIP=on"
        [ -n "${WORKBENCH_ROCM_TARGETS:-}" ] && args="$args -DAMDGPU_TARGETS=$WORKBENCH_ROCM_TARGETS"
        ;;
    none) [ "$os" = Darwin ] && args="$args -DGGML_METAL=off" ;;
    *) echo "WORKBENCH_GPU_BACKEND must be auto, cuda, metal, vulkan, rocm or none," \
            "not '$backend'" >&2; exit 2 ;;
esac
[ "${WORKBENCH_PORTABLE:-0}" = 1 ] && args="$args -DGGML_NATIVE=off"
if [ "$arch" = x86_64 ] && [ "$os" = Linux ]; then
    args="$args -DCMAKE_C_FLAGS=-mno-amx-int8 -DCMAKE_CXX_FLAGS=-mno-amx-int8"
fi
echo "$args"
