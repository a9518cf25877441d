#!/usr/bin/env bash
# The GPU run of benchmarks/placement.py, in one device call (see ../shared/gpu/README.md):
#   run: bash .gpu-bundle/build-cuda.sh && bash benchmarks/gpu/placement.sh    carry: .gpu-bundle
# Builds llama.cpp's fitter (llama-fit-params) beside the recipe's llama-bench, writes a
# synthetic llama-2-7B Q4_0, checks that it loads (llama-cpp-python alone, then through the
# workbench's runtime, with n_gpu_layers -1, 0 and 33), then runs the benchmark.
# A cold device call spends about 300 s on the build; BENCH_S (default 250) bounds the rest,
# and the benchmark writes its results as it goes.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
B=/tmp/llama-build/bin
cmake --build /tmp/llama-build --target llama-fit-params -j"$(nproc)" > /tmp/fit.log 2>&1 || tail -20 /tmp/fit.log
export PYTHONPATH=/tmp/site:$PWD LLAMA_CPP_LIB_PATH=$B LLAMA_BENCH=$B/llama-bench LLAMA_FIT_PARAMS=$B/llama-fit-params
V=$(ls /tmp/llama-src/*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf)
C=benchmarks/.cache; mkdir -p $C; M=$C/synthetic-llama-2-7b.Q4_0.gguf
[ -f $M ] || python3 -c "from workbench.models import synthetic; synthetic('llama-2-7b','q4_0','$M',tokenizer_from='$V')"
probe() { timeout 90 python3 -c "$1" "$M" > /tmp/p.log 2>&1; echo "$2: rc=$? $(tail -1 /tmp/p.log)"; }
probe 'import sys, llama_cpp as L
L.llama_backend_init(); p=L.llama_model_default_params(); p.no_alloc=True; p.load_mode=0
print("loaded", bool(L.llama_model_load_from_file(sys.argv[1].encode(), p)))' "llama-cpp-python alone, n_gpu_layers -1"
for ngl in -1 0 33; do
probe "import sys; from workbench.engine.runtime import Runtime; from workbench.config import LoadConfig
print(Runtime().measure_buffers(sys.argv[1], LoadConfig(n_gpu_layers=$ngl, flash_attn='on')))" "workbench runtime, n_gpu_layers $ngl"
done
if command -v gdb > /dev/null; then  # a C backtrace of the runtime's load, should it crash
  timeout 120 gdb -batch -ex run -ex bt --args python3 -c "import sys
from workbench.engine.runtime import Runtime; from workbench.config import LoadConfig
print(Runtime().measure_buffers(sys.argv[1], LoadConfig(n_gpu_layers=33, flash_attn='on')))" "$M" \
    2>&1 | grep -A 25 "SIGSEGV\|^#0" | head -40
fi
timeout "${BENCH_S:-250}" python3 benchmarks/placement.py --quick --gpu --model $M --tag gpu \
    > "$OUT/placement_gpu.log" 2>&1; echo "benchmark rc=$?"
grep -v "^\s*$" "$OUT/placement_gpu.log" | grep -v "^llama\|^load\|^print_info\|^sched\|^graph\|^ggml\|^init_tok\|^  Device" | tail -40
cp benchmarks/results/placement_gpu.json "$OUT/" 2>/dev/null; true
