"""NVIDIA GPUs through torch's caching allocator (allocated, reserved) and the driver.

The two layers are read separately and never mixed: torch's counters say what
its tensors and cache hold; the driver (NVML, else ``cudaMemGetInfo``) says what
the whole device has in use, which includes the CUDA context, cuBLAS workspaces,
ONNX Runtime's arena and every other process.

Nothing here creates a CUDA context: an untouched device reads 0 allocated and
0 reserved (true: torch holds nothing there) with driver numbers from NVML, or
``None`` without NVML; cleanup calls are no-ops on a device without a context.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from vramkit.devices import _nvml
from vramkit.devices._base import BackendBase, DeviceMemory

__all__ = ["CudaBackend", "is_initialized"]


def is_initialized() -> bool:
    """Whether torch has initialised CUDA in this process (never initialises it)."""
    return bool(torch.cuda.is_initialized())  # type: ignore[no-untyped-call]


def _has_context(index: int) -> bool:
    """Whether this process already has a CUDA primary context on ``cuda:<index>``."""
    if not is_initialized():
        return False
    probe = getattr(torch._C, "_cuda_hasPrimaryContext", None)
    if probe is None:  # very old or unusual builds: assume the current device only
        return index == torch.cuda.current_device()
    return bool(probe(index))


def _allocator_counters(index: int) -> tuple[int, int, int]:
    """Allocated, peak allocated and reserved bytes of torch's allocator on ``cuda:<index>``."""
    # The nested dict straight from C++ is several times cheaper than
    # torch.cuda.memory_stats(), which flattens a few hundred keys per call.
    raw = getattr(torch._C, "_cuda_memoryStats", None)
    if raw is not None:
        nested: dict[str, Any] = raw(index)
        allocated = nested.get("allocated_bytes", {}).get("all", {})
        reserved = nested.get("reserved_bytes", {}).get("all", {})
        return (
            int(allocated.get("current", 0)),
            int(allocated.get("peak", 0)),
            int(reserved.get("current", 0)),
        )
    flat: dict[str, Any] = torch.cuda.memory_stats(index)
    return (
        int(flat.get("allocated_bytes.all.current", 0)),
        int(flat.get("allocated_bytes.all.peak", 0)),
        int(flat.get("reserved_bytes.all.current", 0)),
    )


class CudaBackend(BackendBase):
    """CUDA devices: allocator counters from torch, driver numbers from NVML or the runtime."""

    kind = "cuda"
    indexed = True
    preferred = True
    pins_host_copies = True

    def __init__(self) -> None:
        self._warm_lock = threading.Lock()
        self._warmed: set[int] = set()

    def is_available(self) -> bool:
        """Whether torch was built with CUDA and sees at least one GPU."""
        return bool(torch.cuda.is_available())

    def why_unavailable(self) -> str:
        """A build without CUDA, or no GPU visible to it."""
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return f"this torch ({torch.__version__}) was built without CUDA"
        return "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides them all)"

    def current_index(self) -> int:
        """The current CUDA device once torch has initialised CUDA, else 0 (nothing is started)."""
        return int(torch.cuda.current_device()) if is_initialized() else 0

    def notes(self) -> tuple[str, ...]:
        """Where the driver numbers come from when NVML cannot answer."""
        reason = _nvml.unavailable_reason()
        if not reason:
            return ()
        return (f"NVML unavailable ({reason}): driver numbers from CUDA where a context exists",)

    def warm_up(self, index: int) -> None:
        """Create the CUDA context and RNG state of ``cuda:<index>`` once, so they never count."""
        if index in self._warmed:
            return
        with self._warm_lock:
            if index in self._warmed:
                return
            torch.randn(1, device=f"cuda:{index}")
            torch.cuda.synchronize(index)
            self._warmed.add(index)

    def release_workspaces(self, index: int) -> None:
        """Release cuBLAS workspaces, which torch keeps per stream and counts as allocated."""
        if not is_initialized():
            return
        clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear is not None:
            clear()

    def device_count(self) -> int:
        """How many GPUs torch sees (after ``CUDA_VISIBLE_DEVICES``)."""
        return int(torch.cuda.device_count()) if self.is_available() else 0

    def read(self, index: int) -> DeviceMemory:
        """Read ``cuda:<index>``: allocator counters and driver numbers, in bytes."""
        allocated = peak = reserved = 0
        if is_initialized():
            allocated, peak, reserved = _allocator_counters(index)
        used = free = total = None
        driver = _nvml.memory(index)
        if driver is not None:
            total, free, used = driver.total_bytes, driver.free_bytes, driver.used_bytes
        elif _has_context(index):
            free, total = (int(x) for x in torch.cuda.mem_get_info(index))
            used = total - free
        return DeviceMemory(
            device=f"cuda:{index}",
            allocated_bytes=allocated,
            peak_allocated_bytes=peak,
            reserved_bytes=reserved,
            used_bytes=used,
            free_bytes=free,
            total_bytes=total,
            process_used_bytes=_nvml.process_used(index),
        )

    def read_process(self, index: int, pid: int) -> int | None:
        """Bytes process ``pid`` (a worker) holds on ``cuda:<index>`` per NVML, context included.

        Returns:
            Bytes; 0 when the process has no context there (or is gone);
            ``None`` without NVML or where the driver hides per-process usage.
        """
        return _nvml.process_used(index, pid)

    def empty_cache(self, index: int) -> None:
        """Release torch's cached blocks, finished IPC handles, and cached pinned host memory."""
        if not is_initialized():
            return
        torch.cuda.empty_cache()
        if _has_context(index):
            torch.cuda.ipc_collect()  # type: ignore[no-untyped-call]
        # Pinned host buffers (the cpu offload tier) are cached by torch's host
        # allocator and never returned by malloc_trim: release them explicitly.
        empty_host = getattr(torch.accelerator, "empty_host_cache", None)
        if empty_host is not None:
            empty_host()

    def synchronize(self, index: int) -> None:
        """Wait for all streams on ``cuda:<index>``, so deferred frees have happened."""
        if _has_context(index):
            torch.cuda.synchronize(index)

    def reset_peak(self, index: int) -> None:
        """Restart ``peak_allocated_bytes`` from the current allocation."""
        if is_initialized():
            torch.cuda.reset_peak_memory_stats(index)
