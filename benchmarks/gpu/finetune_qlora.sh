#!/usr/bin/env bash
# The GPU run of benchmarks/finetune.py --qlora (QLoRA beside LoRA on the default model), in
# two device calls on one machine, the second sent as soon as the first returns (a machine
# stays warm 30 s; see ../shared/gpu/README.md):
#   here:   bash benchmarks/gpu/finetune_qlora.sh prepare
#   call 1: bash benchmarks/gpu/finetune_qlora.sh stage
#           carry: .gpuwheels/site, benchmarks/.cache/gpu-model/a
#   call 2: bash benchmarks/gpu/finetune_qlora.sh run
#           carry: .gpuwheels/site, benchmarks/.cache/gpu-model/b
#   here:   copy the finetune_gpu.json that call 2 returns into benchmarks/results/
# Two calls, because the default model's file (98 MB) is more than one call carries (64 MiB
# with the working tree) and its quantized blocks hardly compress (xz: 90 MB): it travels in
# two parts, joined and checked (sha256) there. bitsandbytes is not on the machine's image:
# `prepare` installs its wheel here into .gpuwheels/site with only its CPU and CUDA 13.0
# libraries (the machine's torch is 2.11+cu130; the other CUDA builds make the wheel 43 MB),
# beside gguf (transformers reads GGUF with it). `stage` keeps the first part in /tmp and
# trains a synthetic tiny model briefly both ways, so a broken QLoRA path shows in the first
# call, before the second part travels.
set -u
D=benchmarks/.cache/gpu-model

prepare() {  # here, in the project root, with the project's environment
    set -e
    local py=${PYTHON:-.venv/bin/python} tmp
    tmp=$(mktemp -d)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_24_x86_64 -d "$tmp" \
        "bitsandbytes==${BNB_VERSION:-0.50.2}" \
        "gguf==$("$py" -c 'import importlib.metadata as m; print(m.version("gguf"))')"
    rm -rf .gpuwheels/site
    "$py" -m pip install -q --no-deps --no-compile --target .gpuwheels/site "$tmp"/*.whl
    find .gpuwheels/site/bitsandbytes -name 'libbitsandbytes_*.so' ! -name '*_cpu.so' \
        ! -name '*_cuda130.so' -delete
    rm -rf "$tmp" "$D"; mkdir -p "$D/a" "$D/b"
    local m
    m=$("$py" -c 'from workbench.models.default import default_model_path as d; print(d())')
    head -c 50000000 "$m" > "$D/a/part"
    tail -c +50000001 "$m" > "$D/b/part"
    (cd "$(dirname "$m")" && sha256sum "$(basename "$m")") > "$D/b/SHA256SUMS"
    "$py" -c "from workbench.models import synthetic; synthetic('tiny', 'q8_0', '$D/a/tiny.Q8_0.gguf', tokenizer_from='$m')"
    du -sh .gpuwheels/site "$D"/a "$D"/b
}

machine() {  # the GPU machine: bitsandbytes and gguf on the path, the workbench's files in /tmp
    OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
    local sp
    sp=$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')
    # bitsandbytes' CUDA library needs cudart and cublas 13, which come with torch's wheels
    LD_LIBRARY_PATH=$(find "$sp/nvidia" \( -name 'libcublas.so.13' -o -name 'libcudart.so.13' \) \
        -printf '%h:' 2>/dev/null)${LD_LIBRARY_PATH:-}
    export LD_LIBRARY_PATH PYTHONPATH=$PWD/.gpuwheels/site:$PWD PYTHONUNBUFFERED=1 \
        WORKBENCH_HOME=/tmp/wbh WORKBENCH_PUBLISH=0
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c 'import torch, transformers, peft, bitsandbytes as b, sys
print(sys.version.split()[0], torch.__version__, transformers.__version__, peft.__version__, b.__version__)'
}

stage() {
    machine
    mkdir -p /tmp/wb-model && cp "$D/a/part" /tmp/wb-model/part-a
    echo "first part kept: $(stat -c %s /tmp/wb-model/part-a) bytes"
    mkdir -p "$OUT/smoke"
    WORKBENCH_BENCH_RESULTS=$OUT/smoke timeout 400 python3 benchmarks/finetune.py --qlora \
        --quick --base "$D/a/tiny.Q8_0.gguf" --name finetune_gpu_smoke > "$OUT/smoke.log" 2>&1
    echo "smoke rc=$?"
    grep -v "Warning\|warnings.warn" "$OUT/smoke.log" | tail -30
}

run() {
    machine
    [ -f /tmp/wb-model/part-a ] || { echo "no first part: a fresh machine; send stage first"; exit 1; }
    local name
    name=$(awk '{print $2}' "$D/b/SHA256SUMS")
    cat /tmp/wb-model/part-a "$D/b/part" > "/tmp/wb-model/$name"
    (cd /tmp/wb-model && sha256sum -c "$OLDPWD/$D/b/SHA256SUMS") || exit 1
    cp benchmarks/results/finetune_gpu.json "$OUT/"  # its earlier parts are kept
    WORKBENCH_BENCH_RESULTS=$OUT timeout 540 python3 benchmarks/finetune.py --qlora \
        --base "/tmp/wb-model/$name" --name finetune_gpu > "$OUT/finetune_qlora.log" 2>&1
    echo "benchmark rc=$?"
    grep -v "Warning\|warnings.warn" "$OUT/finetune_qlora.log" | tail -30
}

"${1:?prepare, stage or run}"
