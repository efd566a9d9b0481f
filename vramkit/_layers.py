"""Which layer of a memory reading is the number: one table, asked by every report.

A reading (:class:`vramkit.devices.DeviceMemory`, or a difference of two) has
several layers: torch's allocator, this process as the driver or the OS sees
it, the whole device. "How much does this use, how much came back" has one
answer per device, :data:`USAGE_LAYERS`: the allocator where it counts
(accelerators), else the process (the host), else the device. Load sizes,
unload and cleanup reports, events, sessions, the pytest plugin and the demo
ask the functions here, and name the layers as :data:`LAYERS` does.

Torch-free on purpose, at the bottom of the package: events and the
cross-process ``vramkit ps`` ask it without importing a framework. Readings
are taken as anything with their fields (:class:`Reading`);
:mod:`vramkit.memory` exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Final, Protocol

__all__ = [
    "DRIVER_LAYERS",
    "LAYERS",
    "USAGE_LAYERS",
    "Reading",
    "driver_layer",
    "grown_bytes",
    "layer_bytes",
    "peak_bytes",
    "shown_layers",
    "usage_change",
    "usage_layer",
]


class Reading(Protocol):
    """The fields of a memory reading, or of a difference of two, in bytes (``None``: unknown)."""

    @property
    def device(self) -> str:
        """The device, such as ``"cuda:0"``."""
        ...

    @property
    def allocated_bytes(self) -> int | None:
        """Torch's allocator: live tensors."""
        ...

    @property
    def peak_allocated_bytes(self) -> int | None:
        """The allocator's peak."""
        ...

    @property
    def reserved_bytes(self) -> int | None:
        """The allocator's tensors and cache."""
        ...

    @property
    def used_bytes(self) -> int | None:
        """The whole device, every process."""
        ...

    @property
    def process_used_bytes(self) -> int | None:
        """This process, as the driver or the OS sees it."""
        ...

    @property
    def process_peak_bytes(self) -> int | None:
        """This process's peak."""
        ...

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-ready dict."""
        ...


LAYERS: Final[Mapping[str, str]] = MappingProxyType(
    {
        "allocated": "allocated_bytes",
        "reserved": "reserved_bytes",
        "process": "process_used_bytes",
        "used": "used_bytes",
    }
)
"""The layers reports compare, by the name they use, and the reading field of each."""

USAGE_LAYERS: Final = ("allocated", "process", "used")
"""Which layer says how much something uses or gave back: the first one a reading has.

torch's allocator where it counts (accelerators); else this process as the
driver or the OS sees it (the host, where torch keeps no counters); else the
whole device as the driver reports it.
"""

DRIVER_LAYERS: Final = ("process", "used")
"""Which layer is the driver's (or the OS's) view: this process where known, else the device."""


def layer_bytes(reading: Reading, layer: str | None) -> int | None:
    """The bytes of ``reading`` (a reading or a difference) in ``layer`` (a key of :data:`LAYERS`).

    Returns:
        The bytes, or ``None`` when the layer is ``None`` or unknown in ``reading``.
    """
    return None if layer is None else getattr(reading, LAYERS[layer])


def _first(reading: Reading, order: tuple[str, ...]) -> str | None:
    return next((layer for layer in order if layer_bytes(reading, layer) is not None), None)


def usage_layer(reading: Reading) -> str | None:
    """The layer that says how much is used on ``reading``'s device (see :data:`USAGE_LAYERS`).

    Example:
        >>> from vramkit.devices import DeviceMemory
        >>> usage_layer(DeviceMemory("cpu", process_used_bytes=1 << 20, used_bytes=1 << 30))
        'process'
    """
    return _first(reading, USAGE_LAYERS)


def driver_layer(reading: Reading) -> str | None:
    """The layer that is the driver's (or the OS's) view of a device: see :data:`DRIVER_LAYERS`."""
    return _first(reading, DRIVER_LAYERS)


def peak_bytes(reading: Reading) -> int | None:
    """The peak in the usage layer: the allocator's peak where it counts, else the process's."""
    layer = usage_layer(reading)
    if layer == "allocated":
        return reading.peak_allocated_bytes
    return reading.process_peak_bytes if layer == "process" else None


def usage_change(before: Reading, after: Reading) -> tuple[str, int] | None:
    """How much the usage layer moved from ``before`` to ``after``: the layer, and the bytes.

    The layer is the first of :data:`USAGE_LAYERS` both readings have.
    """
    for layer in USAGE_LAYERS:
        a, b = layer_bytes(after, layer), layer_bytes(before, layer)
        if a is not None and b is not None:
            return layer, a - b
    return None


def grown_bytes(before: Reading, after: Reading) -> int | None:
    """What an operation added on a device, at least 0, in the first usage layer that moved.

    The allocator is passed over when it did not move: the memory was taken
    outside torch (ONNX Runtime's arena, a native library), and only the
    process or the device shows it.
    """
    for layer in USAGE_LAYERS:
        a, b = layer_bytes(after, layer), layer_bytes(before, layer)
        if a is not None and b is not None and (layer != "allocated" or a != b):
            return max(a - b, 0)
    return None


def shown_layers(reading: Reading) -> tuple[str, ...]:
    """The layers worth showing for ``reading``'s device, in :data:`LAYERS` order.

    Where the process is the usage layer (the host), the device-wide ``used``
    moves with every other process on the machine and says nothing of ours.
    """
    if usage_layer(reading) == "process":
        return tuple(layer for layer in LAYERS if layer != "used")
    return tuple(LAYERS)
