"""Intel GPUs through ``torch.xpu``, where this torch build exposes it.

``torch.xpu`` mirrors ``torch.cuda``'s memory API (allocated, reserved, peaks,
``mem_get_info``); every call is looked up at use, so a build without XPU
support simply reports the backend unavailable.
"""

from __future__ import annotations

from typing import Any

import torch

from vramkit.devices._base import BackendBase, DeviceMemory

__all__ = ["XpuBackend"]


def _xpu() -> Any:
    return getattr(torch, "xpu", None)


class XpuBackend(BackendBase):
    """Intel XPU devices (``"xpu:0"``...)."""

    kind = "xpu"
    indexed = True
    preferred = True

    def is_available(self) -> bool:
        """Whether this torch build has XPU support and sees a device."""
        xpu = _xpu()
        return bool(xpu is not None and xpu.is_available())

    def why_unavailable(self) -> str:
        """No XPU support in this torch build, or no device."""
        return f"this torch ({torch.__version__}) has no XPU support or sees no XPU device"

    def device_count(self) -> int:
        """How many XPU devices torch sees."""
        return int(_xpu().device_count()) if self.is_available() else 0

    def read(self, index: int) -> DeviceMemory:
        """Read allocator counters and device free/total, in bytes."""
        xpu = _xpu()
        used = free = total = None
        mem_get_info = getattr(xpu, "mem_get_info", None)
        if mem_get_info is not None:
            free, total = (int(x) for x in mem_get_info(index))
            used = total - free
        return DeviceMemory(
            device=f"xpu:{index}",
            allocated_bytes=int(xpu.memory_allocated(index)),
            peak_allocated_bytes=int(xpu.max_memory_allocated(index)),
            reserved_bytes=int(xpu.memory_reserved(index)),
            used_bytes=used,
            free_bytes=free,
            total_bytes=total,
        )

    def empty_cache(self, index: int) -> None:
        """Release the XPU allocator's cache."""
        _xpu().empty_cache()

    def synchronize(self, index: int) -> None:
        """Wait for queued work on ``xpu:<index>``."""
        _xpu().synchronize(index)

    def reset_peak(self, index: int) -> None:
        """Restart the peak counters."""
        _xpu().reset_peak_memory_stats(index)
