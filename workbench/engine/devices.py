"""The compute devices llama.cpp sees (its ggml backend registry). Worker side only."""

from __future__ import annotations

import ctypes
from pathlib import Path

from .protocol import Device

_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


def _load_ggml() -> ctypes.CDLL:
    """libggml: beside libllama wherever that was loaded from (LLAMA_CPP_LIB_PATH included)."""
    from llama_cpp import llama_cpp as bindings

    here = Path(bindings._lib._name).parent
    for name in ("libggml.so", "libggml.dylib", "ggml.dll"):
        if (here / name).exists():
            return ctypes.CDLL(str(here / name))
    from llama_cpp import _ggml

    return _ggml.libggml


def _lib() -> ctypes.CDLL:
    lib = _load_ggml()
    lib.ggml_backend_dev_count.restype = ctypes.c_size_t
    lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
    lib.ggml_backend_dev_get.restype = ctypes.c_void_p
    for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
        fn.argtypes, fn.restype = [ctypes.c_void_p], ctypes.c_char_p
    lib.ggml_backend_dev_type.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_dev_type.restype = ctypes.c_int
    lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t),
                                            ctypes.POINTER(ctypes.c_size_t)]
    return lib


def backend_devices() -> list[Device]:
    import llama_cpp

    llama_cpp.llama_backend_init()
    lib = _lib()
    out = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        out.append(Device(
            name=(lib.ggml_backend_dev_name(dev) or b"").decode(errors="replace"),
            description=(lib.ggml_backend_dev_description(dev) or b"").decode(errors="replace"),
            kind=_TYPES.get(lib.ggml_backend_dev_type(dev), "unknown"),
            memory_free=free.value, memory_total=total.value))
    return out


def has_gpu() -> bool:
    """True when llama.cpp can offload layers to a GPU (an RPC backend alone does not count)."""
    return any(d.kind in ("gpu", "igpu") for d in backend_devices())
