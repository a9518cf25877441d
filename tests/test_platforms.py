"""What differs by platform (memory readings, the llama.cpp build, Windows), the optional
extras' errors, and the machine's settings file. Each platform's rule is tested here,
whatever machine runs the tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import workbench
from workbench import _extras, _platform, settings
from workbench.errors import WorkbenchError

ROOT = Path(__file__).resolve().parent.parent


# ---- memory readings -------------------------------------------------------------------

def test_ru_maxrss_is_bytes_on_macos_and_kib_on_linux():
    assert _platform.maxrss_bytes(5000, "darwin") == 5000
    assert _platform.maxrss_bytes(5000, "linux") == 5000 * 1024
    assert _platform.maxrss_bytes(5000, "freebsd14") == 5000 * 1024


def test_linux_status_fields_are_read_in_bytes():
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  123456 kB\nVmData:\t 777 kB\n"
    assert _platform.status_field_bytes(status, "VmHWM") == 123456 * 1024
    assert _platform.status_field_bytes(status, "VmData") == 777 * 1024
    assert _platform.status_field_bytes(status, "VmSwap") is None
    assert _platform.status_field_bytes("VmHWM:\tgarbage\n", "VmHWM") is None


def test_peak_rss_reads_this_process_in_bytes():
    import psutil

    peak, rss = _platform.peak_rss(), psutil.Process().memory_info().rss
    assert rss * 0.5 <= peak < 64 << 30  # bytes: not KiB (1024x less), not 1024x more


def test_peak_rss_falls_back_to_getrusage_where_there_is_no_proc(monkeypatch):
    import resource

    monkeypatch.setattr(_platform, "_proc_status", lambda: None)
    monkeypatch.setattr(_platform.sys, "platform", "darwin")
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert _platform.peak_rss() >= ru  # read as bytes, the macOS rule
    assert _platform.data_size() is None


# ---- platforms -------------------------------------------------------------------------

def test_windows_is_told_to_use_wsl2():
    _platform.check_supported("linux")
    _platform.check_supported("darwin")
    with pytest.raises(WorkbenchError, match="not on Windows") as e:
        _platform.check_supported("win32")
    assert "WSL2" in e.value.hint
    with pytest.raises(WorkbenchError, match="aix"):
        _platform.check_supported("aix")


def test_importing_the_package_on_windows_says_wsl2():
    code = "import sys; sys.platform = 'win32'; import workbench"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode != 0
    assert "WSL2" in proc.stderr and "not on Windows" in proc.stderr


def _cmake_args(tmp_path: Path, os_name: str, arch: str, *, nvidia: bool = False,
                **env: str) -> str:
    """scripts/llama-cmake-args.sh as it runs on another platform: `uname`, `nvcc` and
    `nvidia-smi` answer as that machine's would."""
    fake = tmp_path / f"bin-{os_name}-{arch}-{nvidia}"
    fake.mkdir(exist_ok=True)
    (fake / "uname").write_text(f'#!/bin/sh\n[ "$1" = -m ] && echo {arch} || echo {os_name}\n')
    tools = {"nvcc": "exit 0", "nvidia-smi": "echo 'GPU 0: NVIDIA H100'"} if nvidia else \
        {"nvcc": "exit 127", "nvidia-smi": "exit 127"}
    for name, body in tools.items():
        (fake / name).write_text(f"#!/bin/sh\n{body}\n")
    for p in fake.iterdir():
        p.chmod(0o755)
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("WORKBENCH_") or k in ("WORKBENCH_HOME",)}
    proc = subprocess.run([str(ROOT / "scripts" / "llama-cmake-args.sh")], text=True,
                          capture_output=True, env={**clean, "PATH": f"{fake}:/usr/bin:/bin",
                                                    **env})
    if proc.returncode:
        raise RuntimeError(proc.stderr)
    return proc.stdout.strip()


def test_llama_cpp_build_flags_per_platform(tmp_path):
    mac = _cmake_args(tmp_path, "Darwin", "arm64")
    assert "-DGGML_METAL=on" in mac and "CUDA" not in mac and "amx" not in mac
    linux = _cmake_args(tmp_path, "Linux", "x86_64")
    assert "-DGGML_RPC=on" in linux and "GGML_CUDA" not in linux and "METAL" not in linux
    assert "-mno-amx-int8" in linux
    arm = _cmake_args(tmp_path, "Linux", "aarch64")
    assert arm == "-DGGML_RPC=on"
    gpu = _cmake_args(tmp_path, "Linux", "x86_64", nvidia=True)
    assert "-DGGML_CUDA=on" in gpu
    assert "-DGGML_VULKAN=on" in _cmake_args(tmp_path, "Linux", "x86_64",
                                             WORKBENCH_GPU_BACKEND="vulkan")
    rocm = _cmake_args(tmp_path, "Linux", "x86_64", WORKBENCH_GPU_BACKEND="rocm",
                       WORKBENCH_ROCM_TARGETS="gfx1100")
    assert "-DGGML_HIP=on" in rocm and "-DAMDGPU_TARGETS=gfx1100" in rocm
    off = _cmake_args(tmp_path, "Linux", "x86_64", nvidia=True, WORKBENCH_CUDA="0")
    assert "CUDA" not in off
    with pytest.raises(RuntimeError, match="WORKBENCH_GPU_BACKEND must be"):
        _cmake_args(tmp_path, "Linux", "x86_64", WORKBENCH_GPU_BACKEND="opencl")


# ---- extras ----------------------------------------------------------------------------

def test_a_missing_extra_names_the_command_that_installs_it(monkeypatch):
    monkeypatch.setitem(_extras.EXTRAS, "train", ("torch", "no_such_module_for_workbench"))
    with pytest.raises(_extras.MissingExtra) as e:
        workbench.finetune(data=[{"text": "hello"}])
    assert "[train] extra" in e.value.message and "no_such_module_for_workbench" in e.value.message
    assert "pip install 'gguf-workbench[train]'" in e.value.hint
    with pytest.raises(_extras.MissingExtra, match="distillation"):
        workbench.distill("default")


def test_report_without_its_extra_names_the_command(monkeypatch, capsys):
    from workbench import cli

    monkeypatch.setitem(_extras.EXTRAS, "report", ("no_such_papermill",))
    assert cli.main(["report", "--benchmarks", "kv_cache", "--committed"]) != 0
    err = capsys.readouterr().err
    assert "gguf-workbench[report]" in err and "Traceback" not in err


# ---- the settings file -----------------------------------------------------------------

@pytest.fixture()
def config_file(tmp_path, monkeypatch):
    p = tmp_path / "config.toml"
    monkeypatch.setenv("WORKBENCH_CONFIG", str(p))
    for var in ("WORKBENCH_MODEL", "WORKBENCH_THREADS", "WORKBENCH_N_CTX", "WORKBENCH_API_KEY"):
        monkeypatch.delenv(var, raising=False)
    return p


def test_settings_come_from_the_file_and_variables_override_it(config_file, monkeypatch):
    config_file.write_text('model = "default"\nthreads = 1\nn_ctx = 1024\nkv_ram_mib = 256\n'
                           'power_cap = 90\n\n[service]\napi_key = "class-key"\n')
    d = settings.defaults()
    assert d["threads"] == 1 and d["n_ctx"] == 1024 and d["kv_ram_mib"] == 256
    assert d["power_cap"] == 90.0 and settings.default_model() == "default"
    assert settings.service_key() == "class-key"
    monkeypatch.setenv("WORKBENCH_N_CTX", "2048")
    monkeypatch.setenv("WORKBENCH_API_KEY", "mine")
    assert settings.load_defaults()["n_ctx"] == 2048 and settings.service_key() == "mine"


def test_no_settings_file_means_no_defaults(config_file):
    assert settings.defaults() == {}


@pytest.mark.parametrize("text, match", [
    ("threads = \"two\"\n", "threads must be int"),
    ("thread = 2\n", "unknown setting 'thread'"),
    ("lora = \"x.gguf\"\n", "unknown setting 'lora'"),
    ("[service]\nkey = 1\n", r"unknown setting \[service\] key"),
    ("threads = true\n", "threads must be int"),
    ("threads = [\n", "not valid TOML"),
])
def test_a_bad_settings_file_is_named(config_file, text, match):
    config_file.write_text(text)
    with pytest.raises(WorkbenchError, match=match) as e:
        settings.defaults()
    assert str(config_file) in e.value.message


def test_a_bad_variable_is_named(config_file, monkeypatch):
    monkeypatch.setenv("WORKBENCH_THREADS", "many")
    with pytest.raises(WorkbenchError, match=r"\$WORKBENCH_THREADS: threads must be int"):
        settings.defaults()


def test_a_binary_settings_file_is_named(config_file):
    config_file.write_bytes(b"\xff\xfe\x00threads")
    with pytest.raises(WorkbenchError, match="cannot read the settings file"):
        settings.defaults()


def test_the_settings_file_sets_what_load_model_uses(config_file, default_model, loaded):
    config_file.write_text(f'model = "{default_model}"\nthreads = 1\nn_ctx = 1024\n')
    try:
        info = workbench.load_model(progress=False)
        assert info.info.threads == 1 and info.info.n_ctx == 1024
        assert workbench.engine().model.path == str(default_model)
        info = workbench.load_model(progress=False, n_ctx=2048)  # the call wins
        assert info.info.n_ctx == 2048 and info.info.threads == 1
    finally:
        config_file.unlink()
        workbench.load_model(progress=False, n_ctx=2048)


def test_the_example_in_the_docs_is_valid(config_file):
    doc = settings.__doc__
    example = doc[doc.index("# ~/.workbench/config.toml"):doc.index("The same settings")]
    lines = [line[4:] for line in example.splitlines()[1:]]
    config_file.write_text("\n".join(lines))
    d = settings.defaults()
    assert d["threads"] == 2 and d["service"]["api_key"] == "change-me"
