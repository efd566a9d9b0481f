"""Apple GPUs through torch's MPS backend (``torch.mps``).

Apple silicon shares RAM between CPU and GPU, so there is no separate driver
"free": the total is Metal's recommended working-set size for this process,
what this process holds is ``driver_allocated_memory`` (tensors plus the
allocator's cache), and free is what remains of the working set, capped by
the host's available RAM.

The real calls are ``torch.mps.empty_cache`` and friends; there is no
``torch.backends.mps.empty_cache``.
"""

from __future__ import annotations

import torch

from vramkit.devices._base import BackendBase, DeviceMemory

__all__ = ["MpsBackend"]


class MpsBackend(BackendBase):
    """The single MPS device (``"mps"``)."""

    kind = "mps"
    indexed = False
    preferred = True

    def is_available(self) -> bool:
        """Whether torch was built with MPS and this Mac supports it."""
        return bool(torch.backends.mps.is_available())

    def why_unavailable(self) -> str:
        """MPS needs Apple silicon and a build with it."""
        return "MPS needs Apple silicon and a torch build with MPS support"

    def device_count(self) -> int:
        """One GPU on Apple silicon, none elsewhere."""
        return 1 if self.is_available() else 0

    def read(self, index: int = 0) -> DeviceMemory:
        """Read MPS memory in bytes (no peak counter exists: ``peak_allocated_bytes`` is None)."""
        import psutil

        allocated = int(torch.mps.current_allocated_memory())
        driver = int(torch.mps.driver_allocated_memory())
        total = int(torch.mps.recommended_max_memory())
        free = max(min(total - driver, psutil.virtual_memory().available), 0)
        return DeviceMemory(
            device="mps",
            allocated_bytes=allocated,
            reserved_bytes=driver,
            used_bytes=total - free,
            free_bytes=free,
            total_bytes=total,
            process_used_bytes=driver,
        )

    def empty_cache(self, index: int = 0) -> None:
        """Release the MPS allocator's cached buffers."""
        torch.mps.empty_cache()

    def synchronize(self, index: int = 0) -> None:
        """Wait for queued MPS work."""
        torch.mps.synchronize()

    def reset_peak(self, index: int = 0) -> None:
        """MPS keeps no peak counter: nothing to reset."""
