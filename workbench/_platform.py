"""What differs between the platforms the workbench runs on: Linux (x86-64, aarch64) and
macOS on Apple Silicon. Windows is served through WSL2, which is Linux.

Each rule takes the platform as a parameter (default: this one), so that every rule is
tested on every machine.
"""

from __future__ import annotations

import sys

SUPPORTED = ("linux", "darwin")


def check_supported(platform: str = sys.platform) -> None:
    """Refuse a platform the workbench does not run on, saying what to do instead."""
    if platform.startswith("linux") or platform == "darwin":
        return
    from .errors import WorkbenchError

    if platform in ("win32", "cygwin", "msys"):
        raise WorkbenchError(
            "the workbench runs on Linux and macOS, not on Windows itself",
            "On Windows, run it under WSL2: `wsl --install`, then in the Linux shell clone "
            "the repository and run `make lab` (an NVIDIA GPU works there with the CUDA "
            "driver for WSL).")
    raise WorkbenchError(f"the workbench does not support this platform ({platform})",
                         "It runs on Linux (x86-64, aarch64) and macOS on Apple Silicon.")


def maxrss_bytes(ru_maxrss: int, platform: str = sys.platform) -> int:
    """`getrusage`'s ru_maxrss in bytes: macOS counts bytes, Linux (and the BSDs) KiB."""
    return ru_maxrss if platform == "darwin" else ru_maxrss * 1024


def status_field_bytes(status_text: str, field: str) -> int | None:
    """A memory field of Linux's /proc/<pid>/status ("VmHWM:  1234 kB") in bytes."""
    for line in status_text.splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                unit = parts[2].lower() if len(parts) > 2 else "kb"
                return int(parts[1]) * (1024 if unit == "kb" else 1)
    return None


def _proc_status() -> str | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return f.read()
    except OSError:  # not Linux
        return None


def peak_rss() -> int:
    """This process's peak resident memory, bytes.

    Linux: VmHWM, not ru_maxrss, which Linux carries across exec (a spawned worker
    would report its parent's size) and which cannot be reset. macOS: ru_maxrss, in bytes
    there (a spawned process starts its own count)."""
    text = _proc_status()
    peak = status_field_bytes(text, "VmHWM") if text else None
    if peak is not None:
        return peak
    import resource

    return maxrss_bytes(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def reset_peak_rss() -> bool:
    """Start the peak again from the current size, where the platform can (Linux: "5" to
    /proc/self/clear_refs). False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def data_size() -> int | None:
    """This process's data segment (Linux's VmData), bytes; None where unknown."""
    text = _proc_status()
    return status_field_bytes(text, "VmData") if text else None
