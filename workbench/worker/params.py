"""llama.cpp's model and context parameters from a resolved LoadConfig, for the runtime's
model and a draft model alike."""

from __future__ import annotations

import ctypes

import llama_cpp as L

from ..config import LoadConfig

_FLASH_ATTN = {"auto": L.LLAMA_FLASH_ATTN_TYPE_AUTO, "on": L.LLAMA_FLASH_ATTN_TYPE_ENABLED,
               "off": L.LLAMA_FLASH_ATTN_TYPE_DISABLED}
_GGML_TYPES = {"f16": L.GGML_TYPE_F16, "q8_0": L.GGML_TYPE_Q8_0, "q4_0": L.GGML_TYPE_Q4_0}


def model_params(cfg: LoadConfig):
    mparams = L.llama_model_default_params()
    mparams.n_gpu_layers = cfg.n_gpu_layers  # resolved by the planner
    if cfg.tensor_split:
        split = (ctypes.c_float * L.llama_max_devices())(*cfg.tensor_split)
        mparams.tensor_split = ctypes.cast(split, ctypes.POINTER(ctypes.c_float))
        mparams._keep_split = split  # C reads it during the load
    if cfg.rpc_servers:
        import faulthandler

        # llama.cpp aborts this process when a node is lost: an expected end here, which
        # the kernel explains; a Python stack dump of every thread would only add noise.
        faulthandler.disable()
        from .libs import DEV_GPU, DEV_IGPU, device_array, local_devices, rpc_devices

        # Only the devices the plan names: local GPUs first when it uses them, then each
        # node's, in tensor_split's order. Layers below n_gpu_layers stay on this CPU.
        handles = [d.handle for d in local_devices() if d.kind in (DEV_GPU, DEV_IGPU)][:1] \
            if cfg.device == "gpu" else []
        # One device per node, its first: the plan sized one share per node, and an
        # rpc-worker serves one device.
        for endpoint in cfg.rpc_servers:
            handles += rpc_devices(endpoint)[:1]
        devices = device_array(handles)
        mparams.devices = ctypes.cast(devices, ctypes.c_void_p)
        mparams._keep_devices = devices
    return mparams


def context_params(cfg: LoadConfig):
    cparams = L.llama_context_default_params()
    cparams.n_ctx = cfg.n_ctx
    cparams.n_batch = cfg.n_batch
    cparams.n_ubatch = min(cfg.n_ubatch, cfg.n_batch)
    cparams.n_seq_max = cfg.n_parallel
    cparams.n_threads = cfg.threads  # resolved by the planner
    cparams.n_threads_batch = cfg.threads
    cparams.flash_attn_type = _FLASH_ATTN[cfg.flash_attn]
    cparams.type_k = _GGML_TYPES[cfg.type_k]
    cparams.type_v = _GGML_TYPES[cfg.type_v]
    cparams.no_perf = True
    return cparams
