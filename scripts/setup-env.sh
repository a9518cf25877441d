#!/usr/bin/env bash
# Creates .venv and installs the workbench with everything it needs.
# llama-cpp-python is compiled from source with the arguments that
# scripts/llama-cmake-args.sh gives (RPC backend on; CUDA where there is a GPU).
# The compiled wheel is cached per build variant, so a second set-up takes seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${VENV:-.venv}
python=${PYTHON:-python3}

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
"$venv/bin/pip" install --find-links "$wheels" -e '.[test]'
# The panel: the labextension and its server extension, both enabled by the install.
# (the listing is captured first: grep -q closing the pipe early fails under pipefail)
grep -q "workbench-lab.*enabled" <<<"$("$venv/bin/jupyter" labextension list 2>&1)" \
    || { echo "the Workbench panel (workbench-lab) is not enabled" >&2; exit 1; }
grep -q "workbench.labext.*enabled" <<<"$("$venv/bin/jupyter" server extension list 2>&1)" \
    || { echo "the Workbench server extension is not enabled" >&2; exit 1; }
"$venv/bin/workbench" check
