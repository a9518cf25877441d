#!/usr/bin/env bash
# The GPU run of benchmarks/placement.py, in one device call (see ../shared/gpu/README.md):
#   run: export T0=$(date +%s); bash .gpu-bundle/build-cuda.sh && bash benchmarks/gpu/placement.sh
#   carry: .gpu-bundle
# Builds llama.cpp's fitter (llama-fit-params) beside the recipe's llama-bench, writes a
# synthetic llama-2-7B Q4_0, checks that the workbench's runtime loads it, then runs the
# benchmark until the call's time (DEADLINE_S after T0, default 585 s) is nearly spent.
# The benchmark writes its results as it goes; a second call on a warm machine skips the build.
# PARTS picks the benchmark's parts; the others are kept from benchmarks/results/placement_gpu.json.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}
B=/tmp/llama-build/bin
[ -x $B/llama-fit-params ] || cmake --build /tmp/llama-build --target llama-fit-params -j"$(nproc)" \
    > /tmp/fit.log 2>&1 || tail -20 /tmp/fit.log
export PYTHONPATH=/tmp/site:$PWD LLAMA_CPP_LIB_PATH=$B LLAMA_BENCH=$B/llama-bench LLAMA_FIT_PARAMS=$B/llama-fit-params
V=$(ls /tmp/llama-src/*/vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf)
C=benchmarks/.cache; mkdir -p $C; M=$C/synthetic-llama-2-7b.Q4_0.gguf
t=$(date +%s)
[ -f $M ] || python3 -c "from workbench.models import synthetic; synthetic('llama-2-7b','q4_0','$M',tokenizer_from='$V')"
echo "synthetic model: $(( $(date +%s) - t )) s, $(stat -c %s $M) bytes"
probe() { timeout 90 python3 -c "$1" "$M" > /tmp/p.log 2>&1; echo "$2: rc=$? $(tail -1 /tmp/p.log)"; }
# What the gguf package pulls in here (see worker/main.py on import order).
python3 -c "import sys, gguf; print('gguf imports:', sorted(m for m in ('sentencepiece', 'mistral_common', 'torch', 'transformers') if m in sys.modules))"
probe "import sys; from workbench.worker.runtime import Runtime; from workbench.config import LoadConfig
print(Runtime().measure_buffers(sys.argv[1], LoadConfig(n_gpu_layers=33, flash_attn='on')))" "workbench runtime, n_gpu_layers 33"
left=$(( ${DEADLINE_S:-585} - ($(date +%s) - T0) ))
echo "benchmark: $left s left"
CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0} timeout "$left" \
    python3 benchmarks/placement.py --quick --gpu --model $M --tag gpu --parts "${PARTS:-memory,choice,peer,speed,split}" \
    > "$OUT/placement_gpu.log" 2>&1; echo "benchmark rc=$?"
grep -v "^\s*$" "$OUT/placement_gpu.log" | grep -v "^llama\|^load\|^print_info\|^sched\|^graph\|^ggml\|^init_tok\|^  Device" | tail -40
cp benchmarks/results/placement_gpu.json "$OUT/" 2>/dev/null; true
