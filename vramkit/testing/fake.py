"""A scripted device for testing policy code without a GPU.

:class:`FakeDevice` answers :class:`vramkit.devices.DeviceBackend` with memory
that a test moves by hand: allocate, free, grow the cache, add memory held
outside the allocator or by other processes, or queue exact readings. It
counts the ``empty_cache``, ``synchronize`` and ``reset_peak`` calls made on
it, so a test can check *when* a policy cleaned up.

It is for policy logic only (cleanup cadence, pressure thresholds, eviction
order, leak-judgement rules): it proves nothing about a real backend, whose
behaviour only real hardware and real torch, FunASR or ONNX Runtime objects
can show. Never let it be the only test of a real backend.

>>> import vramkit
>>> from vramkit.testing.fake import FakeDevice
>>> fake = FakeDevice(total="8GiB")
>>> with fake.install():
...     fake.allocate("6GiB")
...     round(vramkit.snapshot("fake:0")["fake:0"].used_fraction, 2)
0.75
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import threading
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast

from vramkit._units import format_bytes, parse_bytes
from vramkit.devices import (
    BackendBase,
    DeviceMemory,
    get_backend,
    register_backend,
    unregister_backend,
)
from vramkit.errors import InvalidArgumentError

__all__ = ["FakeDevice"]

_KIND = re.compile(r"^[a-z_][a-z0-9_]*$")
_FIELDS = frozenset(f.name for f in dataclasses.fields(DeviceMemory)) - {"device"}


@dataclass(slots=True)
class _State:
    total: int
    allocated: int = 0
    reserved: int = 0
    peak: int = 0
    outside: int = 0  # this process, outside the caching allocator (context, arenas)
    others: int = 0  # other processes on the same device


class FakeDevice(BackendBase):
    """Scripted memory answering the device protocol; for policy tests only.

    Memory model, per device: ``reserved`` is what the fake caching allocator
    holds (allocated plus its cache), ``used = reserved + outside + others``,
    ``process_used = reserved + outside``. :meth:`allocate` takes from the
    cache first and grows ``reserved`` for the rest; :meth:`free` returns
    bytes to the cache; ``empty_cache`` drops the cache. Allocating past the
    total raises ``torch.OutOfMemoryError``, as a real accelerator would.

    Attributes:
        kind: The device kind, ``"fake"`` unless told otherwise; devices are
            named ``"fake:0"``, ``"fake:1"``...
        indexed: Always true.
        empty_cache_calls: ``empty_cache`` calls, over all devices.
        synchronize_calls: ``synchronize`` calls, over all devices.
        reset_peak_calls: ``reset_peak`` calls, over all devices.
        read_calls: Readings taken, over all devices.
    """

    indexed = True

    def __init__(self, kind: str = "fake", *, count: int = 1, total: int | str = "8GiB") -> None:
        """Make ``count`` empty devices of ``total`` bytes each.

        Args:
            kind: The device kind to register as (lower-case letters, digits, ``_``).
            count: How many devices (``fake:0`` ... ``fake:<count-1>``).
            total: Capacity of each device, in bytes or a string such as ``"8GiB"``.

        Raises:
            InvalidArgumentError: A malformed kind, a count below 1, or a bad total.
        """
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise InvalidArgumentError(
                f"kind must be a lower-case name such as 'fake' (letters, digits, _); got {kind!r}"
            )
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise InvalidArgumentError(f"count must be a whole number, 1 or more; got {count!r}")
        size = parse_bytes(total, what="total")
        if size == 0:
            raise InvalidArgumentError("total must be more than 0 bytes")
        self.kind = kind
        self._lock = threading.Lock()
        self._states = [_State(total=size) for _ in range(count)]
        self._scripted: list[deque[DeviceMemory]] = [deque() for _ in range(count)]
        self.empty_cache_calls = 0
        self.synchronize_calls = 0
        self.reset_peak_calls = 0
        self.read_calls = 0

    # -- the device protocol -------------------------------------------------------

    def is_available(self) -> bool:
        """Always available."""
        return True

    def device_count(self) -> int:
        """The ``count`` given at construction."""
        return len(self._states)

    def read(self, index: int = 0) -> DeviceMemory:
        """The next scripted reading of device ``index``, else one computed from its state."""
        with self._lock:
            self.read_calls += 1
            queue = self._scripted[self._check_index(index)]
            if queue:
                return queue.popleft()
            return self._computed(index)

    def empty_cache(self, index: int = 0) -> None:
        """Drop the fake allocator's cache: ``reserved`` falls to ``allocated``."""
        with self._lock:
            state = self._states[self._check_index(index)]
            self.empty_cache_calls += 1
            state.reserved = state.allocated

    def synchronize(self, index: int = 0) -> None:
        """Count the call; there is nothing to wait for."""
        with self._lock:
            self._check_index(index)
            self.synchronize_calls += 1

    def reset_peak(self, index: int = 0) -> None:
        """Restart the peak from the current allocation."""
        with self._lock:
            state = self._states[self._check_index(index)]
            self.reset_peak_calls += 1
            state.peak = state.allocated

    # -- scripting ---------------------------------------------------------------

    def allocate(self, nbytes: int | str, index: int = 0) -> None:
        """Allocate ``nbytes`` through the fake caching allocator.

        Raises:
            torch.OutOfMemoryError: When the cache plus the device's free bytes
                cannot hold the allocation.
        """
        amount = parse_bytes(nbytes, what="nbytes")
        with self._lock:
            state = self._states[self._check_index(index)]
            cached = state.reserved - state.allocated
            grow = max(amount - cached, 0)
            free = state.total - state.reserved - state.outside - state.others
            if grow > free:
                import torch

                raise torch.OutOfMemoryError(
                    f"{self.kind}:{index} out of memory. Tried to allocate "
                    f"{format_bytes(amount)}; {format_bytes(free)} free of "
                    f"{format_bytes(state.total)}, {format_bytes(cached)} cached"
                )
            state.reserved += grow
            state.allocated += amount
            state.peak = max(state.peak, state.allocated)

    def free(self, nbytes: int | str, index: int = 0) -> None:
        """Free ``nbytes`` of allocations; the bytes stay in the cache until ``empty_cache``."""
        amount = parse_bytes(nbytes, what="nbytes")
        with self._lock:
            state = self._states[self._check_index(index)]
            if amount > state.allocated:
                raise InvalidArgumentError(
                    f"cannot free {format_bytes(amount)}: only "
                    f"{format_bytes(state.allocated)} allocated on {self.kind}:{index}"
                )
            state.allocated -= amount

    def cache(self, nbytes: int | str, index: int = 0) -> None:
        """Grow the cache by ``nbytes``: reserved without being allocated."""
        amount = parse_bytes(nbytes, what="nbytes")
        with self._lock:
            state = self._states[self._check_index(index)]
            state.reserved += amount

    def set_outside(self, nbytes: int | str, index: int = 0) -> None:
        """Set what this process holds outside the allocator (CUDA context, ONNX Runtime arena)."""
        amount = parse_bytes(nbytes, what="nbytes")
        with self._lock:
            self._states[self._check_index(index)].outside = amount

    def set_others(self, nbytes: int | str, index: int = 0) -> None:
        """Set what other processes hold on the device (seen in ``used_bytes`` only)."""
        amount = parse_bytes(nbytes, what="nbytes")
        with self._lock:
            self._states[self._check_index(index)].others = amount

    def script(self, *readings: DeviceMemory | Mapping[str, int | None], index: int = 0) -> None:
        """Queue exact readings, returned by :meth:`read` in order before computed ones resume.

        Args:
            readings: :class:`DeviceMemory` objects, or mappings of some of its
                byte fields (``{"used_bytes": 7 * 2**30}``); fields left out
                take the device's current computed values.
            index: The device they are for.

        Raises:
            InvalidArgumentError: An unknown field name or a non-integer value.
        """
        with self._lock:
            target = self._check_index(index)
            current = self._computed(target)
            queued = []
            for reading in readings:
                if isinstance(reading, DeviceMemory):
                    queued.append(dataclasses.replace(reading, device=current.device))
                    continue
                if not isinstance(reading, Mapping):
                    raise InvalidArgumentError(
                        f"a scripted reading is a DeviceMemory or a mapping of its fields; "
                        f"got {reading!r}"
                    )
                unknown = set(reading) - _FIELDS
                if unknown:
                    raise InvalidArgumentError(
                        f"unknown DeviceMemory fields {sorted(unknown)}; known: {sorted(_FIELDS)}"
                    )
                for key, value in reading.items():
                    if value is not None and (
                        isinstance(value, bool) or not isinstance(value, int)
                    ):
                        raise InvalidArgumentError(f"{key} must be an int of bytes or None")
                queued.append(dataclasses.replace(current, **cast("dict[str, Any]", reading)))
            self._scripted[target].extend(queued)

    @contextlib.contextmanager
    def install(self, *, replace: bool = False) -> Iterator[FakeDevice]:
        """Register this device with vramkit for the duration of a ``with`` block.

        Args:
            replace: Allow taking over a kind already registered; the previous
                backend is put back on exit.

        Yields:
            This device.

        Raises:
            InvalidArgumentError: The kind is taken and ``replace`` is false.
        """
        previous: BackendBase | None = None
        with contextlib.suppress(InvalidArgumentError):
            previous = get_backend(self.kind)
        register_backend(self, replace=replace)
        try:
            yield self
        finally:
            if previous is not None:
                register_backend(previous, replace=True)
            else:
                unregister_backend(self.kind)

    # -- helpers -------------------------------------------------------------------

    def _check_index(self, index: int) -> int:
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not 0 <= index < len(self._states)
        ):
            raise InvalidArgumentError(
                f"index must be 0..{len(self._states) - 1} for this fake device; got {index!r}"
            )
        return index

    def _computed(self, index: int) -> DeviceMemory:
        state = self._states[index]
        used = state.reserved + state.outside + state.others
        return DeviceMemory(
            device=f"{self.kind}:{index}",
            allocated_bytes=state.allocated,
            peak_allocated_bytes=state.peak,
            reserved_bytes=state.reserved,
            used_bytes=used,
            free_bytes=max(state.total - used, 0),
            total_bytes=state.total,
            process_used_bytes=state.reserved + state.outside,
        )

    def __repr__(self) -> str:
        return f"<FakeDevice {self.kind} x{len(self._states)}>"
