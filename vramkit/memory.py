"""Frozen, cheap readings of every device at once, their differences, and which layer counts.

>>> import vramkit
>>> before = vramkit.snapshot()
>>> after = vramkit.snapshot()
>>> delta = after - before
>>> "cpu" in delta
True

A reading has several layers (allocator, process, whole device); which one
answers "how much does this use, how much came back" is decided once, for
every report, event, session and pool: :data:`USAGE_LAYERS`, exported here
with the functions that apply it (they live in a torch-free module at the
bottom of the package, so that events and ``vramkit ps`` can ask it too).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from vramkit._layers import (
    DRIVER_LAYERS,
    LAYERS,
    USAGE_LAYERS,
    driver_layer,
    grown_bytes,
    layer_bytes,
    peak_bytes,
    shown_layers,
    usage_change,
    usage_layer,
)
from vramkit._units import format_bytes
from vramkit.devices import (
    Device,
    DeviceLike,
    DeviceMemory,
    MemoryFields,
    available_devices,
    resolve_device,
)
from vramkit.errors import InvalidArgumentError

__all__ = [
    "DRIVER_LAYERS",
    "LAYERS",
    "USAGE_LAYERS",
    "DeviceMemoryDelta",
    "MemoryDelta",
    "MemorySnapshot",
    "driver_layer",
    "grown_bytes",
    "layer_bytes",
    "peak_bytes",
    "shown_layers",
    "snapshot",
    "usage_change",
    "usage_layer",
]

_BYTE_FIELDS = tuple(f.name for f in fields(MemoryFields) if f.name != "device")


@dataclass(frozen=True, slots=True)
class MemorySnapshot(Mapping[str, DeviceMemory]):
    """Readings of several devices taken together, keyed by device name (``"cuda:0"``).

    Attributes:
        readings: One :class:`DeviceMemory` per device, ``cpu`` first.
        wall_time: ``time.time()`` when the snapshot was taken (seconds since the epoch).
        monotonic: ``time.perf_counter()`` at the same moment, for intervals.
    """

    readings: tuple[DeviceMemory, ...]
    wall_time: float
    monotonic: float
    _index: dict[str, DeviceMemory] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {r.device: r for r in self.readings})

    def __getitem__(self, device: str) -> DeviceMemory:
        try:
            return self._index[device]
        except KeyError:
            raise KeyError(
                f"no reading for {device!r}; this snapshot has {', '.join(self._index) or 'none'}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def __sub__(self, earlier: MemorySnapshot) -> MemoryDelta:
        if not isinstance(earlier, MemorySnapshot):
            return NotImplemented
        return self.diff(earlier)

    def diff(self, earlier: MemorySnapshot) -> MemoryDelta:
        """What changed since ``earlier``: ``after.diff(before)`` equals ``after - before``.

        Devices read in only one of the two snapshots are left out.
        """
        deltas = tuple(
            DeviceMemoryDelta.between(earlier[name], reading)
            for name, reading in self._index.items()
            if name in earlier
        )
        return MemoryDelta(deltas, seconds=self.monotonic - earlier.monotonic)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"wall_time": ..., "devices": {"cpu": {...}, ...}}``."""
        return {
            "wall_time": self.wall_time,
            "devices": {r.device: r.to_dict() for r in self.readings},
        }

    def __str__(self) -> str:
        return "\n".join(str(r) for r in self.readings)

    def __repr__(self) -> str:
        return f"MemorySnapshot({', '.join(self._index)} at {self.wall_time:.3f})"


@dataclass(frozen=True, slots=True)
class DeviceMemoryDelta(MemoryFields):
    """How one device's readings changed, field by field, in bytes (``after - before``).

    It has :class:`~vramkit.devices.DeviceMemory`'s fields; a field is ``None``
    when either reading lacked it.
    """

    @classmethod
    def between(cls, before: DeviceMemory, after: DeviceMemory) -> DeviceMemoryDelta:
        """The change from ``before`` to ``after`` (readings of the same device)."""
        values = {}
        for name in _BYTE_FIELDS:
            a, b = getattr(after, name), getattr(before, name)
            values[name] = None if a is None or b is None else a - b
        return cls(device=after.device, **values)

    @property
    def headline_bytes(self) -> int | None:
        """The single most telling change, in the first of :data:`USAGE_LAYERS` known here."""
        return layer_bytes(self, usage_layer(self))

    def freed(self) -> dict[str, int | None]:
        """Bytes given back per layer, positive when memory was freed (negative: it grew).

        Returns:
            One entry per layer of :data:`LAYERS`: ``allocated`` and ``reserved``
            (the framework's allocator), ``process`` (this process per the
            driver, or RSS), ``used`` (the whole device, every process);
            ``None`` where a layer cannot be read.
        """
        return {layer: None if (v := layer_bytes(self, layer)) is None else -v for layer in LAYERS}

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the changes."""
        return {"device": self.device, **{name: getattr(self, name) for name in _BYTE_FIELDS}}

    def __str__(self) -> str:
        parts = []
        for layer in LAYERS:
            value = layer_bytes(self, layer)
            if value is not None:
                label = "device used" if layer == "used" else layer
                parts.append(f"{label} {format_bytes(value, signed=True)}")
        return f"{self.device:<7} " + " · ".join(parts or ["no comparable readings"])


@dataclass(frozen=True, slots=True)
class MemoryDelta(Mapping[str, DeviceMemoryDelta]):
    """The difference of two snapshots, keyed by device name.

    Attributes:
        deltas: One :class:`DeviceMemoryDelta` per device present in both snapshots.
        seconds: Time between the two snapshots.
    """

    deltas: tuple[DeviceMemoryDelta, ...]
    seconds: float

    def __getitem__(self, device: str) -> DeviceMemoryDelta:
        for delta in self.deltas:
            if delta.device == device:
                return delta
        raise KeyError(f"no delta for {device!r}")

    def __iter__(self) -> Iterator[str]:
        return (d.device for d in self.deltas)

    def __len__(self) -> int:
        return len(self.deltas)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"seconds": ..., "devices": {"cpu": {...}}}``."""
        return {"seconds": self.seconds, "devices": {d.device: d.to_dict() for d in self.deltas}}

    def __str__(self) -> str:
        return "\n".join(str(d) for d in self.deltas)


def snapshot(device: DeviceLike | Iterable[DeviceLike] | None = None) -> MemorySnapshot:
    """Read memory of every available device (or the ones named) at once.

    Cheap enough to take around every inference call: on a CPU-only Linux host
    it reads ``/proc/self/statm`` through a descriptor kept open, and what
    changes slowly on a throttle (see :mod:`vramkit.devices.cpu`). It never creates
    a CUDA context (see :mod:`vramkit.devices.cuda`).

    Args:
        device: ``None`` for every available device (``cpu`` included), one
            device name, or several.

    Returns:
        A frozen :class:`MemorySnapshot`.

    Raises:
        InvalidArgumentError: A malformed or unknown device name.
        DeviceUnavailableError: A device this machine lacks.
    """
    return read_devices(target_devices(device))


def read_devices(devices: tuple[Device, ...]) -> MemorySnapshot:
    """A snapshot of devices already resolved (by :func:`target_devices`), not checked again."""
    wall, mono = time.time(), time.perf_counter()
    readings = tuple(d.read() for d in devices)
    return MemorySnapshot(readings, wall, mono)


def target_devices(device: DeviceLike | Iterable[DeviceLike] | None) -> tuple[Device, ...]:
    if device is None:
        return available_devices()
    if isinstance(device, str | int | Device) or not isinstance(device, Iterable):
        return (resolve_device(device),)
    targets = tuple(resolve_device(d) for d in device)
    if not targets:
        raise InvalidArgumentError("device must name at least one device; got an empty sequence")
    return targets
