"""ctypes access to the parts of ggml that llama-cpp-python does not bind: the device
registry and the RPC backend (libggml-rpc, built with GGML_RPC=on).

Loaded only in processes that own llama.cpp objects: the engine worker and the
rpc-worker. The kernel never imports this module.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

from ..errors import WorkbenchError

_vp = ctypes.c_void_p
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2  # enum ggml_backend_dev_type


@dataclass(frozen=True)
class Lib:
    ggml: ctypes.CDLL     # the device registry (and, loaded globally, ggml-base)
    rpc: ctypes.CDLL


def _lib_dir() -> str:
    if os.environ.get("LLAMA_CPP_LIB_PATH"):
        return os.environ["LLAMA_CPP_LIB_PATH"]
    import llama_cpp

    return os.path.join(os.path.dirname(llama_cpp.__file__), "lib")


def _sig(fn, restype, *argtypes):  # noqa: ANN001, ANN202 - ctypes plumbing
    fn.restype, fn.argtypes = restype, list(argtypes)


@functools.lru_cache(maxsize=1)
def lib() -> Lib:
    """The ggml libraries llama-cpp-python ships, with the signatures we call."""
    import llama_cpp  # noqa: F401 - loads libggml and libllama first

    folder = _lib_dir()
    names = os.listdir(folder) if os.path.isdir(folder) else []
    rpc_name = next((n for n in sorted(names) if n.startswith("libggml-rpc.")), None)
    base_name = next((n for n in sorted(names) if n.startswith("libggml-base.")), None)
    ggml_name = next((n for n in sorted(names) if n.startswith("libggml.")), None)
    if rpc_name is None or base_name is None or ggml_name is None:
        raise WorkbenchError(
            f"this llama-cpp-python has no RPC backend (no libggml-rpc in {folder})",
            'Reinstall it with CMAKE_ARGS="-DGGML_RPC=on" (the project\'s set-up does).')
    ctypes.CDLL(os.path.join(folder, base_name), mode=ctypes.RTLD_GLOBAL)
    # the device registry lives in libggml; with RTLD_GLOBAL it also resolves ggml-base's
    ggml = ctypes.CDLL(os.path.join(folder, ggml_name), mode=ctypes.RTLD_GLOBAL)
    rpc = ctypes.CDLL(os.path.join(folder, rpc_name), mode=ctypes.RTLD_GLOBAL)
    _sig(ggml.ggml_backend_dev_count, ctypes.c_size_t)
    _sig(ggml.ggml_backend_dev_get, _vp, ctypes.c_size_t)
    _sig(ggml.ggml_backend_dev_type, ctypes.c_int, _vp)
    _sig(ggml.ggml_backend_dev_name, ctypes.c_char_p, _vp)
    _sig(ggml.ggml_backend_dev_description, ctypes.c_char_p, _vp)
    _sig(ggml.ggml_backend_dev_memory, None, _vp, ctypes.POINTER(ctypes.c_size_t),
         ctypes.POINTER(ctypes.c_size_t))
    _sig(ggml.ggml_backend_reg_dev_count, ctypes.c_size_t, _vp)
    _sig(ggml.ggml_backend_reg_dev_get, _vp, _vp, ctypes.c_size_t)
    _sig(rpc.ggml_backend_rpc_add_server, _vp, ctypes.c_char_p)
    _sig(rpc.ggml_backend_rpc_start_server, None, ctypes.c_char_p, ctypes.c_char_p,
         ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(_vp))
    return Lib(ggml, rpc)


@dataclass(frozen=True)
class LocalDevice:
    handle: int
    name: str
    description: str
    kind: int
    free: int
    total: int


def local_devices() -> list[LocalDevice]:
    """The devices ggml sees in this process (CPU, GPUs)."""
    b = lib().ggml
    out = []
    for i in range(b.ggml_backend_dev_count()):
        d = b.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        b.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        out.append(LocalDevice(d, b.ggml_backend_dev_name(d).decode(),
                               b.ggml_backend_dev_description(d).decode(),
                               b.ggml_backend_dev_type(d), free.value, total.value))
    return out


def rpc_devices(endpoint: str) -> list[int]:
    """The device handles of the RPC server at `endpoint` (connects to it). The kernel
    probes every node before a load, since llama.cpp aborts on one it cannot reach."""
    b, r = lib().ggml, lib().rpc
    reg = r.ggml_backend_rpc_add_server(endpoint.encode())
    if not reg:
        raise WorkbenchError(f"the RPC server at {endpoint} offers no device",
                             "Start it with `workbench rpc-worker`, which serves one.")
    return [b.ggml_backend_reg_dev_get(reg, i) for i in range(b.ggml_backend_reg_dev_count(reg))]


def device_array(handles: list[int]):  # noqa: ANN201 - a ctypes array
    """A NULL-terminated array of device handles, as llama_model_params.devices takes."""
    return (_vp * (len(handles) + 1))(*handles, None)
