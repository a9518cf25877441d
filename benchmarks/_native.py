"""llama.cpp's own tools, built from the source this llama-cpp-python vendors, for
benchmarks that put the workbench side by side with them."""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("WORKBENCH_BENCH_CACHE") or ROOT / "benchmarks" / ".cache")


def _cmake_args(gpu: bool) -> list[str]:
    env = dict(os.environ, WORKBENCH_CUDA="1" if gpu else "0")
    out = subprocess.run([str(ROOT / "scripts/llama-cmake-args.sh")], capture_output=True,
                         text=True, check=True, env=env).stdout.split()
    return [a for a in out if a != "-DGGML_RPC=on"]


def build_tool(target: str, gpu: bool = False) -> Path:
    """A llama.cpp tool (llama-bench, llama-quantize, ...) built from the llama.cpp vendored
    in this llama-cpp-python, once per version; later calls find it built."""
    return _build(target, gpu=gpu, examples=False)


def build_example(target: str, gpu: bool = False) -> Path:
    """A llama.cpp example program (llama-lookup, llama-speculative-simple, ...) built like
    `build_tool`, in the same build folder (so the libraries are compiled once) with the
    examples switched on."""
    return _build(target, gpu=gpu, examples=True)


def _build(target: str, *, gpu: bool, examples: bool) -> Path:
    import llama_cpp

    version = llama_cpp.__version__
    root = CACHE / f"llama.cpp-{version}{'-cuda' if gpu else ''}"
    exe = root / "build" / "bin" / target
    if exe.exists():
        return exe
    sdist_dir = CACHE / "sdist"
    sdist = sdist_dir / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
                        ":all:", f"llama-cpp-python=={version}", "-d", str(sdist_dir)],
                       check=True)
    src = root / "src"
    if not src.exists():
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix):]
            tar.extractall(src, members=members, filter="data")
    print(f"building {target} in {root} (once; log in build.log) ...", file=sys.stderr)
    root.mkdir(parents=True, exist_ok=True)
    logf = open(root / "build.log", "a")
    # the examples switch only adds targets: tools built before stay built
    subprocess.run(["cmake", "-S", str(src), "-B", str(root / "build"),
                    "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF",
                    "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
                    f"-DLLAMA_BUILD_EXAMPLES={'ON' if examples else 'OFF'}",
                    "-DLLAMA_BUILD_SERVER=OFF", *_cmake_args(gpu)],
                   check=True, stdout=logf, stderr=subprocess.STDOUT)
    subprocess.run(["cmake", "--build", str(root / "build"), "--target", target,
                    "-j", str(os.cpu_count() or 2)], check=True, stdout=logf,
                   stderr=subprocess.STDOUT)
    return exe
