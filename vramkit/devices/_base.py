"""The device protocol, its defaults, the reading every backend returns, and a parsed device.

A :class:`Device` is what :func:`vramkit.devices.resolve_device` hands back: it
knows its backend and reads itself (``device.read()``). Everything a kind of
device does differently (how it reads, cleans, warms up, why it may be missing)
is a method of its backend; the code above ``vramkit.devices`` asks the device
and never branches on kind names.
"""

from __future__ import annotations

import abc
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol, runtime_checkable

from vramkit._units import format_bytes, format_part_of
from vramkit.errors import InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BackendBase",
    "Device",
    "DeviceBackend",
    "DeviceMemory",
    "MemoryFields",
    "get_backend",
]


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

    @property
    def backend(self) -> BackendBase:
        """The backend registered for this device's kind.

        Raises:
            InvalidArgumentError: No backend knows the kind (any more).
        """
        return get_backend(self.kind)

    @property
    def is_host(self) -> bool:
        """Whether this is the host's RAM (see :attr:`BackendBase.host`)."""
        return self.backend.host

    @property
    def pins_host_copies(self) -> bool:
        """Whether host copies of this device's tensors are pinned (see :class:`BackendBase`)."""
        return self.backend.pins_host_copies

    def read(self) -> DeviceMemory:
        """Read this device's memory now, in bytes (see :meth:`DeviceBackend.read`)."""
        return self.backend.read(self.index or 0)

    def synchronize(self) -> None:
        """Wait for work queued on this device, so deferred frees have happened."""
        self.backend.synchronize(self.index or 0)

    def reset_peak(self) -> None:
        """Start this device's peak tracking afresh."""
        self.backend.reset_peak(self.index or 0)

    def clean(self) -> str | None:
        """Give this device's cached memory back (see :meth:`BackendBase.clean`)."""
        return self.backend.clean(self.index or 0)

    def warm_up(self) -> None:
        """Create what the device keeps for good once used (see :meth:`BackendBase.warm_up`)."""
        self.backend.warm_up(self.index or 0)

    def release_workspaces(self) -> None:
        """Free library workspaces the allocator counts (see :class:`BackendBase`)."""
        self.backend.release_workspaces(self.index or 0)


@dataclass(frozen=True, slots=True)
class MemoryFields:
    """The byte fields of a reading, declared once: a reading and a difference of two share them.

    See :class:`DeviceMemory` for what each field means; in a difference
    (:class:`vramkit.memory.DeviceMemoryDelta`) each is ``after - before``.
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


@dataclass(frozen=True, slots=True)
class DeviceMemory(MemoryFields):
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

    These are the required parts. :class:`BackendBase` adds optional hooks
    with defaults; a backend that does not derive from it gets the defaults
    when it is registered.
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


_OPTIONAL: Final = (
    "host",
    "preferred",
    "pins_host_copies",
    "why_unavailable",
    "current_index",
    "notes",
    "clean",
    "warm_up",
    "release_workspaces",
)


class BackendBase(abc.ABC):
    """The device protocol with every optional hook given its default, in one place.

    Derive a backend from it and override only what the kind does
    differently: the built-in backends and :class:`vramkit.testing.FakeDevice`
    do. A backend registered without deriving from it (any object answering
    :class:`DeviceBackend`) is wrapped so that these defaults apply to it too.

    Attributes:
        host: This kind is the host's RAM: torch keeps no allocator counters
            there, its cache is the process heap (trimmed once per cleanup),
            the cpu offload tier frees nothing on it, and memory comes back
            to the OS synchronously. Default ``False``.
        preferred: :func:`vramkit.devices.default_device` may choose this kind
            over the host (real accelerators). Default ``False``, so that a
            scripted test device never becomes the default.
        pins_host_copies: Host copies of this device's weights (the cpu
            offload tier) are pinned, so that the way back is a fast DMA.
            Default ``False``.
    """

    kind: str
    indexed: bool
    host: bool = False
    preferred: bool = False
    pins_host_copies: bool = False

    @abc.abstractmethod
    def is_available(self) -> bool:
        """Whether this kind of device can be used in this process."""

    @abc.abstractmethod
    def device_count(self) -> int:
        """How many devices of this kind are visible (0 when unavailable)."""

    @abc.abstractmethod
    def read(self, index: int) -> DeviceMemory:
        """Read the memory of device ``index`` (0 for unindexed kinds)."""

    @abc.abstractmethod
    def empty_cache(self, index: int) -> None:
        """Return the allocator's unused cached blocks to the driver."""

    @abc.abstractmethod
    def synchronize(self, index: int) -> None:
        """Wait for queued work on the device, so frees have happened."""

    @abc.abstractmethod
    def reset_peak(self, index: int) -> None:
        """Start peak tracking afresh."""

    def why_unavailable(self) -> str:
        """Why :meth:`is_available` says no, in words for an error message."""
        return f"the {self.kind!r} backend reports no device"

    def current_index(self) -> int:
        """The device a bare kind name (``"cuda"``) means now, never initialising anything."""
        return 0

    def notes(self) -> tuple[str, ...]:
        """What a person reading ``vramkit status`` should know about this kind's numbers."""
        return ()

    def clean(self, index: int) -> str | None:
        """Give cached memory back: wait for queued work, then empty the cache.

        Returns:
            The step for a cleanup report (``"empty_cache"``), or ``None`` when
            there was nothing to do for this kind.
        """
        self.synchronize(index)
        self.empty_cache(index)
        return "empty_cache"

    def warm_up(self, index: int) -> None:  # noqa: B027 - an optional hook: no-op by default
        """Create, once, what the device keeps for good after its first use (a context).

        A leak check calls it before its baseline, so that this memory never
        counts as a leak. Default: nothing.
        """

    def release_workspaces(self, index: int) -> None:  # noqa: B027 - optional, as above
        """Free library workspaces that the allocator counts as allocated (cuBLAS's).

        A leak check calls it before it measures. Default: nothing.
        """


class _Completed(BackendBase):
    """A backend that does not derive from :class:`BackendBase`, with the defaults filled in."""

    def __init__(self, inner: DeviceBackend) -> None:
        self.inner = inner
        self.kind = inner.kind
        self.indexed = inner.indexed
        for name in _OPTIONAL:
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def is_available(self) -> bool:
        return self.inner.is_available()

    def device_count(self) -> int:
        return self.inner.device_count()

    def read(self, index: int) -> DeviceMemory:
        return self.inner.read(index)

    def empty_cache(self, index: int) -> None:
        self.inner.empty_cache(index)

    def synchronize(self, index: int) -> None:
        self.inner.synchronize(index)

    def reset_peak(self, index: int) -> None:
        self.inner.reset_peak(index)

    def __getattr__(self, name: str) -> Any:
        # Whatever else the registered object offers (its counters, say) stays reachable.
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return repr(self.inner)


_backends: dict[str, BackendBase] = {}  # the registry: filled by vramkit.devices


def completed(backend: DeviceBackend) -> BackendBase:
    """``backend`` when it derives from :class:`BackendBase`, else it wrapped with the defaults."""
    return backend if isinstance(backend, BackendBase) else _Completed(backend)


def get_backend(kind: str) -> BackendBase:
    """The backend registered for ``kind``, with every optional hook answering.

    Raises:
        InvalidArgumentError: When no backend knows that kind.
    """
    try:
        return _backends[kind]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown device kind {kind!r}; known kinds: {', '.join(sorted(_backends))}"
        ) from None
