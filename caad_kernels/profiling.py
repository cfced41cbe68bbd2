"""Peak-memory measurement of a callable, on CUDA and on the CPU.

CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated before the call.

CPU: the process's resident-set high-water mark (``VmHWM``), reset through
``/proc/self/clear_refs`` just before the call, above the resident set at that moment. So that
the resident set follows the live tensors, glibc is told (once, for the rest of the process) to
serve every allocation of 1 MiB or more with its own ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``,
which also stops glibc from raising that threshold as big blocks are freed), so freed tensors go
back to the kernel at once instead of lingering in a fragmented heap; freed heap memory is
handed back first too (``malloc_trim``). Linux only; it measures the whole process, so run
nothing else concurrently (other threads' allocations count too).
"""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 1 << 20


def _trim_heap() -> None:
    gc.collect()
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def cpu_peak_measurable() -> bool:
    """True when the CPU measure works here (Linux with a writable ``/proc/self/clear_refs``)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        _status_kib("VmHWM")
    except OSError:
        return False
    return True


def measure_peak_memory(fn: Callable[[], T], device: torch.device | str = "cpu") -> tuple[T, int]:
    """Run ``fn()`` and return ``(result, peak_bytes)``: the most memory it held above the start.

    Raises RuntimeError on a platform where the CPU measure is unavailable.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        result = fn()
        torch.cuda.synchronize(device)
        return result, max(torch.cuda.max_memory_allocated(device) - base, 0)
    if not cpu_peak_measurable():
        raise RuntimeError("CPU peak-memory measurement needs Linux /proc/self/clear_refs and VmHWM")
    _trim_heap()
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")  # resets VmHWM to the current resident set
    base_kib = _status_kib("VmRSS")
    result = fn()
    peak_kib = _status_kib("VmHWM")
    return result, max(peak_kib - base_kib, 0) * 1024
