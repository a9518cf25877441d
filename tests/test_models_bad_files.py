"""Every kind of bad model file gives a WorkbenchError naming the path and the reason,
the kernel keeps the model it had, and no worker is left crashed."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import psutil
import pytest

import workbench
from workbench.errors import ModelFileError, WorkbenchError

from gguf_edit import patched, truncated, with_strings


def _children_alive() -> bool:
    return all(c.status() != psutil.STATUS_ZOMBIE for c in psutil.Process().children())


def _check(path, reason: str, loaded) -> WorkbenchError:
    pid_before = loaded.pid
    with pytest.raises(ModelFileError) as info:
        workbench.load_model(path, progress=False)
    err = info.value
    assert str(path) in err.message
    assert re.search(reason, err.message), err.message
    assert err.hint
    # nothing lost: the same worker still serves the model it had
    assert loaded.pid == pid_before and loaded.alive
    assert loaded.model is not None
    assert _children_alive()
    return err


def test_missing_file(tmp_path, loaded):
    _check(tmp_path / "nope.gguf", "model file not found", loaded)


def test_directory(tmp_path, loaded):
    (tmp_path / "a.gguf").write_bytes(b"")
    err = _check(tmp_path, "is a directory", loaded)
    assert "a.gguf" in err.hint


def test_empty_file(tmp_path, loaded):
    p = tmp_path / "empty.gguf"
    p.write_bytes(b"")
    _check(p, r"empty file \(0 bytes\)", loaded)


def test_wrong_magic(tmp_path, loaded, default_model):
    p = patched(default_model, tmp_path / "magic.gguf", 0, b"GGUX")
    _check(p, re.escape("not a GGUF file: magic b'GGUX'"), loaded)


def test_unsupported_version(tmp_path, loaded, default_model):
    p = patched(default_model, tmp_path / "v9.gguf", 4, struct.pack("<I", 9))
    _check(p, "GGUF version 9", loaded)


@pytest.mark.parametrize("size", [6, 20, 1_204, 900_000, 1_785_000])
def test_truncated_in_header(tmp_path, loaded, default_model, size):
    p = truncated(default_model, tmp_path / f"cut{size}.gguf", size)
    _check(p, rf"truncated: the file ends at byte {size:,}, inside the GGUF header", loaded)


@pytest.mark.parametrize("size", [1_790_000, 50_000_000, 98_362_431])
def test_truncated_in_data(tmp_path, loaded, default_model, size):
    p = truncated(default_model, tmp_path / f"cut{size}.gguf", size)
    _check(p, rf"truncated: {size:,} of 98,362,432 bytes", loaded)


def test_unknown_architecture_fails_in_llama_cpp_and_worker_survives(tmp_path, loaded,
                                                                     default_model):
    p = with_strings(default_model, tmp_path / "arch.gguf", {"general.architecture": "nosuch"})
    pid = loaded.pid
    with pytest.raises(ModelFileError) as info:
        workbench.load_model(p, progress=False)
    assert "nosuch" in info.value.message and info.value.hint
    assert loaded.pid == pid and loaded.alive
    assert loaded.model is None and "was unloaded first" in info.value.hint
    workbench.load_model(progress=False, n_ctx=2048)
    assert workbench.generate("Hi", max_tokens=3, temperature=0).metrics.generated_tokens >= 1


def test_tensor_type_table_matches_the_gguf_package():
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    from workbench.models.gguf_file import GGML_TYPES

    theirs = {t.value: (t.name, *GGML_QUANT_SIZES[t]) for t in GGMLQuantizationType
              if t in GGML_QUANT_SIZES}
    assert {k: v for k, v in GGML_TYPES.items() if k in theirs} == theirs


def test_the_worker_loads_llama_cpp_before_numpy(default_model):
    # A CUDA build of llama.cpp crashed loading a model in a process that had loaded
    # numpy's (or torch's) native libraries first (see worker/main.py). The spawned
    # worker imports the package, then the worker module, then reads the header.
    import subprocess
    import sys

    code = ("import sys, workbench, workbench.worker.main, workbench.worker.probe; "
            "from workbench.models.inspect import inspect_model; "
            f"inspect_model({str(default_model)!r}); "
            "before = sorted(m for m in ('numpy', 'gguf', 'sentencepiece', 'torch') "
            "if m in sys.modules); import workbench.worker.runtime; "
            "print(before, list(sys.modules).index('llama_cpp.llama_cpp') "
            "< list(sys.modules).index('numpy'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True", out.stdout + out.stderr


def test_unknown_tensor_type(tmp_path, loaded, default_model):
    from workbench.models.gguf_file import read_header

    header = read_header(default_model)
    name, ggml_type = header.tensors[0].name, header.tensors[0].ggml_type
    data = bytearray(Path(default_model).read_bytes()[: header.data_offset])
    # the type field follows the tensor's name and shape in the tensor table
    encoded = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(encoded, header.kv_end) + len(encoded)
    n_dims = struct.unpack_from("<I", data, at)[0]
    type_at = at + 4 + 8 * n_dims
    assert struct.unpack_from("<I", data, type_at)[0] == ggml_type
    struct.pack_into("<I", data, type_at, 250)
    path = tmp_path / "odd-type.gguf"
    path.write_bytes(bytes(data) + Path(default_model).read_bytes()[header.data_offset:])
    err = _check(path, "tensor type 250", loaded)
    assert "damaged" in err.message


@pytest.mark.parametrize("offset, what", [(8, "2^63 tensors"), (16, "2^63 metadata entries"),
                                          (24, "2^63 bytes in one string")])
def test_absurd_counts_are_damage_not_truncation(tmp_path, loaded, default_model, offset,
                                                 what):
    """Counts near 2^63 in a full-length file: named as what they are."""
    size = default_model.stat().st_size
    p = patched(default_model, tmp_path / "absurd.gguf", offset, struct.pack("<Q", 1 << 63),
                keep=size)
    assert p.stat().st_size == size
    err = _check(p, rf"damaged GGUF header: it claims {re.escape(what)}", loaded)
    assert "truncated" not in err.message
