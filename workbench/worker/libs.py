"""The one loader of llama.cpp's shared libraries, and ctypes access to the parts of ggml
that llama-cpp-python does not bind: the device registry, tensor reads for calibration,
and the RPC backend (libggml-rpc, built with GGML_RPC=on).

Loaded only in processes that own llama.cpp objects: the engine worker, the dry-run
probe, the compression children and the rpc-worker. The kernel never imports this
module (tests/test_layers.py checks that).
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass

from ..engine.protocol import Device
from ..errors import WorkbenchError

_vp = ctypes.c_void_p
DEV_CPU, DEV_GPU, DEV_IGPU = 0, 1, 2  # enum ggml_backend_dev_type


_TYPES = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel", 4: "meta"}


@dataclass(frozen=True)
class Lib:
    ggml: ctypes.CDLL               # the device registry and tensors (ggml-base, global)
    rpc_lib: ctypes.CDLL | None     # None: this llama.cpp was built without GGML_RPC
    folder: str

    @property
    def rpc(self) -> ctypes.CDLL:
        if self.rpc_lib is None:
            raise WorkbenchError(
                f"this llama-cpp-python has no RPC backend (no libggml-rpc in {self.folder})",
                'Reinstall it with CMAKE_ARGS="-DGGML_RPC=on" (the project\'s set-up does).')
        return self.rpc_lib


def _lib_dir() -> str:
    """Where libllama was loaded from (LLAMA_CPP_LIB_PATH included): ggml is beside it."""
    from llama_cpp import llama_cpp as bindings

    return os.path.dirname(bindings._lib._name)


def _sig(fn, restype, *argtypes):  # noqa: ANN001, ANN202 - ctypes plumbing
    fn.restype, fn.argtypes = restype, list(argtypes)


@functools.lru_cache(maxsize=1)
def lib() -> Lib:
    """The ggml libraries llama-cpp-python ships, with the signatures we call."""
    import llama_cpp  # noqa: F401 - loads libggml and libllama first

    folder = _lib_dir()
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []

    def named(prefix: str) -> str | None:
        return next((os.path.join(folder, n) for n in names if n.startswith(prefix)), None)

    base, ggml_path, rpc_path = named("libggml-base."), named("libggml."), named("libggml-rpc.")
    if base is not None:
        ctypes.CDLL(base, mode=ctypes.RTLD_GLOBAL)
    if ggml_path is not None:  # with RTLD_GLOBAL the registry also resolves ggml-base's
        ggml = ctypes.CDLL(ggml_path, mode=ctypes.RTLD_GLOBAL)
    else:  # a build that links ggml into one library: llama-cpp-python's own handle
        from llama_cpp import _ggml

        ggml = _ggml.libggml
    rpc = ctypes.CDLL(rpc_path, mode=ctypes.RTLD_GLOBAL) if rpc_path else None
    _sig(ggml.ggml_backend_dev_count, ctypes.c_size_t)
    _sig(ggml.ggml_backend_dev_get, _vp, ctypes.c_size_t)
    _sig(ggml.ggml_backend_dev_type, ctypes.c_int, _vp)
    _sig(ggml.ggml_backend_dev_name, ctypes.c_char_p, _vp)
    _sig(ggml.ggml_backend_dev_description, ctypes.c_char_p, _vp)
    _sig(ggml.ggml_backend_dev_memory, None, _vp, ctypes.POINTER(ctypes.c_size_t),
         ctypes.POINTER(ctypes.c_size_t))
    _sig(ggml.ggml_backend_reg_dev_count, ctypes.c_size_t, _vp)
    _sig(ggml.ggml_backend_reg_dev_get, _vp, _vp, ctypes.c_size_t)
    _sig(ggml.ggml_get_name, ctypes.c_char_p, _vp)
    _sig(ggml.ggml_nbytes, ctypes.c_size_t, _vp)
    _sig(ggml.ggml_backend_tensor_get, None, _vp, _vp, ctypes.c_size_t, ctypes.c_size_t)
    if rpc is not None:
        _sig(rpc.ggml_backend_rpc_add_server, _vp, ctypes.c_char_p)
        _sig(rpc.ggml_backend_rpc_start_server, None, ctypes.c_char_p, ctypes.c_char_p,
             ctypes.c_size_t, ctypes.c_size_t, ctypes.POINTER(_vp))
    return Lib(ggml, rpc, folder)


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
    import llama_cpp

    llama_cpp.llama_backend_init()
    b = lib().ggml
    out = []
    for i in range(b.ggml_backend_dev_count()):
        d = b.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        b.ggml_backend_dev_memory(d, ctypes.byref(free), ctypes.byref(total))
        out.append(LocalDevice(d, (b.ggml_backend_dev_name(d) or b"").decode(errors="replace"),
                               (b.ggml_backend_dev_description(d) or b"").decode(
                                   errors="replace"),
                               b.ggml_backend_dev_type(d), free.value, total.value))
    return out


def backend_devices() -> list[Device]:
    """The devices llama.cpp sees, as the protocol reports them to the kernel."""
    return [Device(name=d.name, description=d.description, kind=_TYPES.get(d.kind, "unknown"),
                   memory_free=d.free, memory_total=d.total) for d in local_devices()]


def has_gpu() -> bool:
    """True when llama.cpp can offload layers to a GPU (an RPC backend alone does not count)."""
    return any(d.kind in (DEV_GPU, DEV_IGPU) for d in local_devices())


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


def system_info(report: object = None) -> str:
    """llama.cpp's own view of the CPU features it was built for (a `_child.run` target)."""
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode(errors="replace")
