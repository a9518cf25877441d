"""NVML (nvidia-ml-py), opened once per user: the one place that knows how."""

from __future__ import annotations

from typing import Any


def open_nvml() -> tuple[Any, list[Any]]:
    """(the pynvml module, one handle per GPU), or (None, []) where there is no NVIDIA
    driver or no nvidia-ml-py."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml, [pynvml.nvmlDeviceGetHandleByIndex(i)
                        for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:
        return None, []


def optional(fn: Any, *args: Any) -> Any:
    """A reading some GPUs (or machines) do not offer: its value, or None."""
    try:
        return fn(*args)
    except Exception:
        return None
