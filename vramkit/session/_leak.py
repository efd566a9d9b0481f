"""The leak check of one session run: the census baseline, the re-checks, the verdict.

A run's :class:`~vramkit.tensors.StorageBaseline` holds the storages alive
before the block; when the block ends, :func:`examine` measures what is left
(on the host a census of new storages, on an accelerator the allocator's
counters), re-checks suspected growth after full collections, judges it, and
searches the holders of the largest new tensors when the verdict is not clean.
Each check walks the heap once, and the holder search reuses that walk.

Inside a :class:`~vramkit._gc.Boundary` (the heap frozen for the block), a
check walks only what the block made. A tensor made in the block that views
a storage from before it holds nothing new: when the census of what the block
made exceeds the tolerance, one walk of the whole heap tells those apart.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from vramkit._gc import Boundary, tensors_in_heap, tensors_since
from vramkit.cleaning import CleanupReport, cleanup
from vramkit.memory import DeviceMemoryDelta, driver_layer, layer_bytes, usage_layer
from vramkit.referrers import find_holders_each
from vramkit.session._report import HeldTensor, Verdict
from vramkit.tensors import StorageBaseline, TensorCensus, storage_keys

if TYPE_CHECKING:
    from vramkit.devices import Device, DeviceMemory
    from vramkit.memory import MemorySnapshot

__all__ = ["Finding", "allocator_growth", "driver_growth", "examine"]

_HINTED: Final = 3  # referrer searches walk the heap: only for the largest few
_PAUSE_SECONDS: Final = 0.01  # between re-checks; grows with each attempt
BROKEN: Final = (
    "the heap was frozen or thawed while the block ran (gc.freeze() or gc.unfreeze() in "
    "it, or a collection of vramkit's under way in another thread), so the census could "
    "not tell what the block made"
)


@dataclass(frozen=True, slots=True)
class _Reading:
    snapshot: MemorySnapshot
    allocator: int | None
    driver: int | None
    census: TensorCensus | None


@dataclass(frozen=True, slots=True)
class Finding:
    """What the leak check of one run concluded.

    Attributes:
        snapshot: The reading the verdict is based on (after the last re-check).
        census: Storages that appeared during the block and are still alive;
            ``None`` when the census could not tell (:data:`BROKEN`).
        allocator: Growth of the allocator layer (see ``SessionReport``).
        driver: Growth of the driver layer.
        verdict: ``"clean"``, ``"leak"`` or ``"unverified"``.
        leaked: Bytes that did not come back in the layer that decided the verdict.
        held: The largest few new tensors with their holders (not clean only).
        checks: How many times memory was measured (1 + re-checks).
        cleanup: The first re-check's cleanup, when one ran.
        note: Why the check could not judge, when it could not; else ``None``.
    """

    snapshot: MemorySnapshot
    census: TensorCensus | None
    allocator: int | None
    driver: int | None
    verdict: Verdict
    leaked: int
    held: tuple[HeldTensor, ...]
    checks: int
    cleanup: CleanupReport | None
    note: str | None = None


def examine(
    device: Device,
    baseline: StorageBaseline,
    before: DeviceMemory,
    after: MemorySnapshot,
    *,
    tolerance: int,
    process_tolerance: int | None,
    retries: int,
    raised: bool,
    boundary: Boundary | None = None,
) -> Finding:
    """Measure what a run left behind, re-check suspected growth, and judge it.

    Args:
        device: The session's device.
        baseline: The storages alive before the block.
        before: The device's reading before the block.
        after: The snapshot after the block (and after its cleanup, if any).
        tolerance: Allowed allocator growth, in bytes.
        process_tolerance: Allowed driver growth, or ``None`` (ignored).
        retries: Extra re-checks after the first full collection.
        raised: Whether the block raised: then no re-check and no holder search.
        boundary: The boundary the block ran inside: then each check walks
            only what the block made.
    """
    on_host = usage_layer(before) != "allocated"  # no allocator counts: a census
    walk = _Walk(device, baseline, boundary, tolerance)
    # A cycle that outlived a few collections sits in the oldest generation,
    # where a young collection leaves it: suspected growth is always
    # re-checked after a full one, so it never reads as a leak.
    first: CleanupReport | None = None
    # One walk of the heap per check, shared by the census and the holder search.
    heap = walk.tensors() if on_host else None
    if on_host and heap is None:
        return _unjudged(after, before, device, checks=1)
    reading, checks = _check(device, walk, before, after, heap), 1
    attempt = 0
    while (
        _suspicious(reading, tolerance, process_tolerance)
        and not raised
        and (first is None or attempt < retries)
    ):
        if heap is not None:
            heap.clear()  # it holds every tensor: none may outlive the collection for it
        if first is not None:
            attempt += 1
            time.sleep(_PAUSE_SECONDS * attempt)
        device.release_workspaces()
        latest = cleanup(device)
        if first is None:
            first = latest
        heap = walk.tensors() if on_host else None
        if on_host and heap is None:
            return _unjudged(latest.after, before, device, checks=checks + 1)
        reading = _check(device, walk, before, latest.after, heap)
        checks += 1
    if heap is None:  # on an accelerator the census is for the report only
        heap = walk.tensors()
    try:
        census = reading.census
        if census is None and heap is not None:
            census = walk.census(heap)
        verdict, leaked = _judge(reading, on_host, tolerance, process_tolerance)
        held: tuple[HeldTensor, ...] = ()
        if verdict != "clean" and not raised and census is not None:
            # The holder search walks the whole heap itself where the checks did not.
            held = _holders(census[:_HINTED], heap if boundary is None else None)
    finally:
        if heap is not None:
            heap.clear()
    return Finding(
        snapshot=reading.snapshot,
        census=census,
        allocator=reading.allocator,
        driver=reading.driver,
        verdict=verdict,
        leaked=leaked,
        held=held,
        checks=checks,
        cleanup=first,
    )


class _Walk:
    """The tensors each check reads, and the census of what is new among them.

    Without a boundary, every tensor; inside one, what the block made, with
    the storages from before the block (views made in it) told apart by one
    walk of the whole heap, only when what the block made exceeds the tolerance.
    """

    __slots__ = ("_baseline", "_boundary", "_device", "_old", "_tolerance")

    def __init__(
        self, device: Device, baseline: StorageBaseline, boundary: Boundary | None, tolerance: int
    ) -> None:
        self._device = str(device)
        self._baseline = baseline
        self._boundary = boundary
        self._tolerance = tolerance
        self._old: frozenset[tuple[str, int]] | None = None

    def tensors(self) -> list[Any] | None:
        """The tensors a check reads; ``None`` when the boundary broke."""
        return tensors_since(self._boundary)  # every tensor without a boundary

    def census(self, tensors: list[Any]) -> TensorCensus:
        """The storages among ``tensors`` that were not alive before the block."""
        census = self._baseline.new_tensors(tensors)
        if self._boundary is None or census.total_bytes <= self._tolerance:
            return census
        if self._old is None:
            # Once per leak check: the storages of every tensor the block did not make.
            made = {id(t) for t in tensors}
            everything = tensors_in_heap()
            try:
                self._old = storage_keys([t for t in everything if id(t) not in made], self._device)
            finally:
                everything.clear()
        return census.without(self._old)


def _unjudged(
    after: MemorySnapshot, before: DeviceMemory, device: Device, *, checks: int
) -> Finding:
    """The finding when the census could not tell what the block made (:data:`BROKEN`)."""
    name = str(device)
    return Finding(
        snapshot=after,
        census=None,
        allocator=None,
        driver=driver_growth(before, after[name]),
        verdict="unverified",
        leaked=0,
        held=(),
        checks=checks,
        cleanup=None,
        note=BROKEN,
    )


def _check(
    device: Device,
    walk: _Walk,
    before: DeviceMemory,
    latest: MemorySnapshot,
    heap: list[Any] | None,
) -> _Reading:
    """One reading; on the host (``heap``: the tensors a check reads) a census."""
    name = str(device)
    census = None
    if heap is not None:
        census = walk.census(heap)
        allocator: int | None = census.total_bytes
    else:
        allocator = allocator_growth(before, latest[name])
    return _Reading(latest, allocator, driver_growth(before, latest[name]), census)


def _suspicious(reading: _Reading, tolerance: int, process_tolerance: int | None) -> bool:
    """Whether the reading could become a leak or unverified verdict: worth re-checking."""
    if reading.allocator is not None and reading.allocator > tolerance:
        return True
    return (
        process_tolerance is not None
        and reading.driver is not None
        and reading.driver > process_tolerance
    )


def _judge(
    reading: _Reading, on_host: bool, tolerance: int, process_tolerance: int | None
) -> tuple[Verdict, int]:
    allocator = reading.allocator or 0
    if allocator > tolerance:
        if on_host:
            return "leak", allocator  # untouched pages never reach RSS: no confirmation
        # As in CudaMemoryLeakCheck: the driver must confirm the allocator.
        if reading.driver is not None and reading.driver > 0:
            return "leak", allocator
        return "unverified", allocator
    if (
        process_tolerance is not None
        and reading.driver is not None
        and reading.driver > process_tolerance
    ):
        return "leak", reading.driver
    return "clean", max(allocator, 0)


def _holders(largest: TensorCensus, heap: list[Any] | None) -> tuple[HeldTensor, ...]:
    """Who holds each of ``largest``: one search for all, bounded by work, not by time.

    The same leak gets the same report on an idle machine and a busy one.
    ``heap`` is the heap's tensors, from the check's own walk (``None``: walked for it).
    """
    infos = [info for info in largest if info.tensor is not None]
    targets = [info.tensor for info in infos]
    chains = find_holders_each(targets, ignore=[targets, infos], heap_tensors=heap)
    targets.clear()
    return tuple(HeldTensor(info, tuple(found)) for info, found in zip(infos, chains, strict=True))


def allocator_growth(before: DeviceMemory, after: DeviceMemory) -> int | None:
    """Growth of ``allocated_bytes`` (``None`` where the device has no allocator counts)."""
    return DeviceMemoryDelta.between(before, after).allocated_bytes


def driver_growth(before: DeviceMemory, after: DeviceMemory) -> int | None:
    """Growth in the driver's (or the OS's) layer: see :data:`vramkit.memory.DRIVER_LAYERS`."""
    delta = DeviceMemoryDelta.between(before, after)
    return layer_bytes(delta, driver_layer(delta))
