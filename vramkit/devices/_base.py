"""The device protocol and the reading every backend returns."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from vramkit._units import format_bytes, format_part_of

if TYPE_CHECKING:
    import torch

__all__ = ["Device", "DeviceBackend", "DeviceMemory"]


@dataclass(frozen=True, slots=True, order=True)
class Device:
    """One place memory lives, named the way torch names it.

    Attributes:
        kind: ``"cuda"``, ``"mps"``, ``"xpu"``, ``"cpu"``, or a registered
            backend's kind (such as a test's fake device).
        index: The device ordinal, or ``None`` for kinds with a single device
            (``cpu``, ``mps``).
    """

    kind: str
    index: int | None = None

    def __str__(self) -> str:
        return self.kind if self.index is None else f"{self.kind}:{self.index}"

    @property
    def torch(self) -> torch.device:
        """This device as a ``torch.device`` (only for kinds torch knows)."""
        import torch

        return torch.device(str(self))


@dataclass(frozen=True, slots=True)
class DeviceMemory:
    """One reading of one device, in bytes, in three layers.

    A field that cannot be read on this machine is ``None``, never 0.

    Attributes:
        device: The device, such as ``"cuda:0"`` or ``"cpu"``.
        allocated_bytes: Bytes the framework's live tensors occupy (torch's
            caching allocator). ``None`` on ``cpu``, where torch does not count.
        peak_allocated_bytes: Highest ``allocated_bytes`` since the last
            :meth:`DeviceBackend.reset_peak`.
        reserved_bytes: Bytes the caching allocator holds from the driver:
            allocated plus its cache.
        used_bytes: Bytes in use on the whole device as the driver (or, for
            ``cpu``, the operating system) reports them, all processes included.
        free_bytes: Bytes the driver or OS could still hand out (for ``cpu``,
            ``MemAvailable`` or the cgroup's remaining limit).
        total_bytes: Capacity of the device (for ``cpu``, RAM or the cgroup limit).
        process_used_bytes: What this process holds as the driver sees it
            (NVML per-process usage on CUDA; resident set size on ``cpu``).
        process_peak_bytes: Highest ``process_used_bytes`` since the last reset,
            where the OS tracks it (``VmHWM`` on Linux).
    """

    device: str
    allocated_bytes: int | None = None
    peak_allocated_bytes: int | None = None
    reserved_bytes: int | None = None
    used_bytes: int | None = None
    free_bytes: int | None = None
    total_bytes: int | None = None
    process_used_bytes: int | None = None
    process_peak_bytes: int | None = None

    @property
    def cache_bytes(self) -> int | None:
        """Bytes the caching allocator keeps without live tensors in them."""
        if self.reserved_bytes is None or self.allocated_bytes is None:
            return None
        return self.reserved_bytes - self.allocated_bytes

    @property
    def used_fraction(self) -> float | None:
        """``used_bytes / total_bytes``, or ``None`` where either is unknown."""
        if self.used_bytes is None or not self.total_bytes:
            return None
        return self.used_bytes / self.total_bytes

    def to_dict(self) -> dict[str, Any]:
        """The reading as a JSON-ready dict of plain ints (or ``None``)."""
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        parts: list[str] = []
        if self.used_bytes is not None and self.total_bytes:
            share = self.used_bytes / self.total_bytes
            parts.append(f"{format_part_of(self.used_bytes, self.total_bytes)} used ({share:.0%})")
        elif self.total_bytes is not None:
            parts.append(f"{format_bytes(self.total_bytes)} total")
        if self.process_used_bytes is not None:
            parts.append(f"process {format_bytes(self.process_used_bytes)}")
        if self.allocated_bytes is not None:
            parts.append(f"allocated {format_bytes(self.allocated_bytes)}")
        if self.reserved_bytes is not None:
            parts.append(f"reserved {format_bytes(self.reserved_bytes)}")
        return f"{self.device:<7} " + " · ".join(parts or ["no readings"])


@runtime_checkable
class DeviceBackend(Protocol):
    """What a kind of device must answer. One object per kind, found by ``kind``.

    Backends never initialise a device context just to answer: a CUDA device
    torch has not touched reads as 0 allocated and driver numbers from NVML
    (or ``None`` without NVML), and its cleanup calls are no-ops.
    """

    kind: str
    """The device kind this backend answers for, such as ``"cuda"``."""

    indexed: bool
    """Whether devices of this kind carry an ordinal (``cuda:0``) or not (``cpu``)."""

    def is_available(self) -> bool:
        """Whether this kind of device can be used in this process."""
        ...

    def device_count(self) -> int:
        """How many devices of this kind are visible (0 when unavailable)."""
        ...

    def read(self, index: int) -> DeviceMemory:
        """Read the memory of device ``index`` (0 for unindexed kinds)."""
        ...

    def empty_cache(self, index: int) -> None:
        """Return the allocator's unused cached blocks to the driver."""
        ...

    def synchronize(self, index: int) -> None:
        """Wait for queued work on the device, so frees have happened."""
        ...

    def reset_peak(self, index: int) -> None:
        """Start peak tracking afresh."""
        ...
