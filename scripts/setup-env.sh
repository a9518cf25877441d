#!/usr/bin/env bash
# Creates .venv and installs the workbench (editable) with the extras in EXTRAS
# (comma-separated: train, report, embed, replicas, eval, test; `make lab` asks for
# train,report,embed,replicas,eval, `make test` for test, which holds them all).
# llama-cpp-python is compiled from source with the arguments that
# scripts/llama-cmake-args.sh gives (RPC backend on; Metal on macOS, CUDA where there is an
# NVIDIA GPU). The compiled wheel is cached per build variant, so a second set-up takes
# seconds.
# PyTorch (the train extra): its default Linux wheel carries CUDA, several GB. Unless an
# NVIDIA GPU is here, the CPU build comes from PyTorch's own CPU index (falling back to the
# default index, with a message, where that index is unreachable). WORKBENCH_TORCH=cpu|cuda
# overrides the choice. With a GPU, QLoRA's bitsandbytes comes too.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
python=${PYTHON:-python3}
extras=${EXTRAS:-train,report,embed,replicas,eval}
torch_cpu_index=${WORKBENCH_TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}

case $(uname -s) in
    Linux|Darwin) ;;
    *) echo "The workbench runs on Linux and macOS; on Windows, run it under WSL2." >&2
       exit 1 ;;
esac

if ! command -v npm >/dev/null 2>&1; then
    echo "Node.js and npm are needed to build the JupyterLab panel (labextension/):" \
         "install them (Debian: apt-get install nodejs npm) and run this again." >&2
    exit 1
fi

cmake_args=$(scripts/llama-cmake-args.sh)

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

# A venv that holds a llama-cpp-python of another build variant gets this one.
if [ "$(cat "$venv/.llama-variant" 2>/dev/null)" != "$variant" ]; then
    "$venv/bin/pip" install --force-reinstall --no-deps "$wheels"/llama_cpp_python-*.whl
    echo "$variant" > "$venv/.llama-variant"
fi
echo "$wheels" > "$venv/.llama-wheels"  # the wheel-install test installs from here too

if [[ ",$extras," =~ ,(train|test), ]]; then
    torch_pin=$(grep -o '"torch==[0-9.]*"' pyproject.toml | tr -d '"')
    nvidia=0
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then nvidia=1; fi
    torch_build=${WORKBENCH_TORCH:-$([ "$nvidia" = 1 ] && echo cuda || echo cpu)}
    case $torch_build in
        cpu|cuda) ;;
        *) echo "WORKBENCH_TORCH must be cpu or cuda, not '$torch_build'" >&2; exit 2 ;;
    esac
    have=$("$venv/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
    # (macOS wheels on the default index are CPU and Metal builds already)
    if [ "$torch_build" = cpu ] && [ "$(uname -s)" = Linux ] \
        && [ "${have%%+*}" != "${torch_pin#torch==}" ]; then
        echo "Installing PyTorch's CPU build ($torch_pin) from $torch_cpu_index..."
        if ! "$venv/bin/pip" install --retries 1 --timeout 20 \
            --index-url "$torch_cpu_index" "$torch_pin"; then
            echo "PyTorch's CPU index ($torch_cpu_index) is unreachable: installing $torch_pin"                  "from the default index instead (on Linux x86-64 that is the CUDA build,"                  "several GB)." >&2
            "$venv/bin/pip" install "$torch_pin"
        fi
    fi
    # QLoRA's 4-bit kernels: CUDA machines only
    [ "$torch_build" = cuda ] && [ "$(uname -s)" = Linux ] && extras="$extras,qlora"
fi

# the distribution's earlier name (`workbench`, now taken on the public index by another
# project): an old editable install of it would shadow this one
if grep -qx "Editable project location: $PWD" <<<"$("$venv/bin/pip" show workbench 2>/dev/null)"; then
    "$venv/bin/pip" uninstall -y workbench
fi
"$venv/bin/pip" install --find-links "$wheels" -e ".[$extras]"
# The panel: the labextension and its server extension, both enabled by the install.
# (the listing is captured first: grep -q closing the pipe early fails under pipefail)
grep -q "workbench-lab.*enabled" <<<"$("$venv/bin/jupyter" labextension list 2>&1)" \
    || { echo "the Workbench panel (workbench-lab) is not enabled" >&2; exit 1; }
grep -q "workbench.labext.*enabled" <<<"$("$venv/bin/jupyter" server extension list 2>&1)" \
    || { echo "the Workbench server extension is not enabled" >&2; exit 1; }
"$venv/bin/workbench" check
