#!/usr/bin/env bash
# The GPU run of benchmarks/power_precision.py, in one device call (see ../shared/gpu/README.md):
#   run: PARTS=mixed bash benchmarks/gpu/power_precision.sh   (or PARTS=power)
#   carry: .gpu-bundle, .gpuwheels
# Builds llama.cpp with CUDA, reports what telemetry the machine offers, then runs the
# benchmark's parts until the call's time (DEADLINE_S after the start, default 585 s) is
# nearly spent. The benchmark writes its results to $OUT as it goes.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
T0=${T0:-$(date +%s)}
[ -f /tmp/llama-build/bin/libllama.so ] || bash .gpu-bundle/build-cuda.sh > /tmp/build.log 2>&1 \
    || { tail -30 /tmp/build.log; exit 1; }
echo "build: $(( $(date +%s) - T0 )) s"
pip install -q --no-deps --no-index --target /tmp/site .gpuwheels/*.whl 2>/dev/null
export PYTHONPATH=/tmp/site:$PWD LLAMA_CPP_LIB_PATH=/tmp/llama-build/bin WORKBENCH_HOME=/tmp/wbh \
    WORKBENCH_PUBLISH=0 WORKBENCH_BENCH_RESULTS=$OUT
V=$(find /tmp/llama-src -name ggml-vocab-gpt-2.gguf | head -1)
nvidia-smi --query-gpu=name,power.draw,power.limit,temperature.gpu,clocks.sm,clocks.max.sm \
    --format=csv
ls /sys/class/powercap/ 2>&1 | head -5
python3 -c "from workbench.power.meter import Telemetry as T; t=T(); print('power:', t.power_sources(), t.missing)"
left=$(( ${DEADLINE_S:-585} - ($(date +%s) - T0) ))
echo "benchmark: $left s left"
timeout "$left" python3 benchmarks/power_precision.py --gpu --quick --parts "${PARTS:-mixed,power}" \
    --vocab "$V" 2>&1 | grep -v "^llama_\|^load\|^print_info" | tail -40
