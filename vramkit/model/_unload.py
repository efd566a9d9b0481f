"""Release and prove: drop a model, show with weak references that it died, free what did not.

An unload hands the object over in a one-item list that :func:`release_and_prove`
empties, so that no frame of the caller keeps the model alive through the
proof. Death is judged on the object, its native handles and the *storages* of
its tensors: a view, ``.data``, a detached copy or a ``state_dict()`` entry is
a new tensor object on the same storage, so the memory lives while any of them
does. Reference counting frees most models the moment vramkit lets go; then
the weak references are already dead and no collection runs. Otherwise the
collector runs once, and what still lives is named (who holds it, as referrer
chains) and, if asked, freed anyway: every tensor on those storages is emptied
and made a tombstone that raises at its next use. Then the device is cleaned
and, on drivers that free asynchronously, the driver's reading is awaited.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from vramkit._gc import collect, tensors_in_heap
from vramkit._units import format_bytes
from vramkit._utils import clear_frames
from vramkit.adapters import Adapter
from vramkit.adapters._torch_util import (
    StorageRefs,
    free_storages,
    owns_tensors,
    refuse_calls,
    storage_bytes,
    storage_key,
)
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceMemory
from vramkit.memory import DeviceMemoryDelta
from vramkit.model.reports import ModelState, UnloadReport
from vramkit.referrers import ReferrerChain, find_holders

__all__ = ["Tracked", "Unload", "await_driver", "release_and_prove"]


@dataclass(frozen=True, slots=True)
class Unload:
    """One unload in progress: what :func:`release_and_prove` needs to know besides the object.

    Attributes:
        name: The model's name.
        device: Its device, read before (``before``) and while waiting for the driver.
        before: The device's reading before anything was released.
        expected: Bytes the unload should give back on the device.
        free_survivors: Free what outlives the unload (see ``ManagedModel``).
        owns: Whether the object is vramkit's to free (``owns=False``: the
            caller keeps it, and vramkit only lets go of its reference).
        advice: What a stale reference's error tells its user to do instead.
        driver_wait: Seconds to wait for the driver to show the memory back.
        state_before: The model's state before the unload.
        started: ``time.perf_counter()`` when the unload was asked for.
        waited: Seconds spent waiting for leases.
    """

    name: str
    device: Device
    before: DeviceMemory
    expected: int | None
    free_survivors: bool
    owns: bool
    advice: str
    driver_wait: float
    state_before: ModelState
    started: float
    waited: float


class Tracked:
    """Weak references to what a loaded object holds: itself, its native handles, its storages.

    Taken just before vramkit drops its reference; nothing here keeps anything
    alive. Modules are followed too, so a holder search can climb the trees
    of those that survive without a pass over the whole heap.
    """

    __slots__ = ("labels", "modules", "objects", "storages", "verified")

    def __init__(self, obj: object, adapter: Adapter) -> None:
        self.objects: list[weakref.ref[Any]] = []
        self.labels: dict[int, str] = {}
        self.verified = True
        self.modules: list[weakref.ref[Any]] = []
        if obj is None:
            self.storages = StorageRefs(())
            return
        candidates = [(obj, type(obj).__name__)]
        candidates += [(h, f"native {type(h).__name__}") for h in adapter.handles(obj)]
        for candidate, label in candidates:
            ref = _weak(candidate)
            if ref is None:
                self.verified = self.verified and candidate is not obj
                continue
            self.objects.append(ref)
            self.labels[id(candidate)] = label
        self.storages = StorageRefs(adapter.tensors(obj))
        for root in adapter.modules(obj).values():
            self.modules.extend(weakref.ref(m) for m in root.modules())

    def dead(self) -> bool:
        """Whether the object, its handles and every storage are gone."""
        return all(ref() is None for ref in self.objects) and self.storages.all_dead()

    def live_objects(self) -> list[Any]:
        """The object and handles still alive."""
        found = [ref() for ref in self.objects]
        return [obj for obj in found if obj is not None]

    def live_modules(self) -> list[Any]:
        """The object's modules still alive."""
        found = [ref() for ref in self.modules]
        return [module for module in found if module is not None]


@dataclass(slots=True)
class _Freed:
    neutralised: int = 0
    held: int = 0
    reasons: tuple[str, ...] = ()


def release_and_prove(box: list[Any], adapter: Adapter, unload: Unload) -> UnloadReport:
    """Release the object in ``box`` (emptied), prove it died, free survivors, clean up.

    Raises:
        BaseException: A ``KeyboardInterrupt`` (or the like) during release,
            re-raised once the object is dropped and the device cleaned.
    """
    obj = box.pop()
    error: str | None = None
    interrupted: BaseException | None = None
    given_back: Mapping[str, int | None] | None = None
    try:
        if obj is not None:
            given_back = adapter.release(obj)
    except Exception as exc:  # recorded and raised after the unload completes
        error = f"{type(exc).__name__}: {exc}"
        clear_frames(exc.__traceback__)  # the release's frames hold the model
    except BaseException as exc:  # KeyboardInterrupt: finish dropping, then re-raise
        error = f"{type(exc).__name__} during release"
        clear_frames(exc.__traceback__)
        interrupted = exc
    tracked = Tracked(obj, adapter)
    obj = None  # the only strong reference vramkit had
    # Reference counting frees most models here and now: a full collection
    # (hundreds of milliseconds on a large heap) only when something survived.
    died = tracked.dead()
    if not died:
        collect()
        died = tracked.dead()
    holders: tuple[ReferrerChain, ...] = ()
    described: tuple[str, ...] = ()
    freed = _Freed()
    if not died:
        holders, described, freed = _survivors(tracked, adapter, unload)
    if interrupted is not None:
        # Stop promptly, but only after our reference is gone: the model is
        # UNLOADED (the caller's finally says so) and pins nothing of ours.
        cleanup(unload.device, gc_collect=False)
        raise interrupted.with_traceback(None)
    report_cleanup = cleanup(unload.device, gc_collect=False)  # collected above if needed
    cleaned = report_cleanup.after.readings[0]
    after = await_driver(unload, cleaned)
    return UnloadReport(
        model=unload.name,
        device=str(unload.device),
        state_before=unload.state_before,
        state_after=ModelState.UNLOADED,
        died=died,
        verified=tracked.verified,
        holders=holders,
        survivors=described,
        neutralised_bytes=freed.neutralised,
        held_bytes=freed.held,
        held=freed.reasons,
        expected_bytes=unload.expected,
        # Layers only the adapter sees (an ended worker process) join the device's.
        freed_bytes={
            **DeviceMemoryDelta.between(unload.before, after).freed(),
            **(given_back or {}),
        },
        memory_before=unload.before,
        memory_after=after,
        cleanup=report_cleanup,
        waited_seconds=unload.waited,
        seconds=time.perf_counter() - unload.started,
        error=error,
    )


def _survivors(
    tracked: Tracked, adapter: Adapter, unload: Unload
) -> tuple[tuple[ReferrerChain, ...], tuple[str, ...], _Freed]:
    """Name what survived, and free it unless told not to."""
    objects = tracked.live_objects()
    alive = tracked.storages.alive()
    # One scan of the heap serves the survivors, the search and the freeing.
    heap = tensors_in_heap() if alive else []
    tensors = _on_storages(heap, alive)
    described = tuple(_describe(objects, tensors, tracked, alive))
    held = sum(alive.values())
    if not unload.owns:  # the caller's object: not ours to search for, free or break
        why = f"{format_bytes(held)}: left to its owner (owns=False)"
        return (), described, _Freed(held=held, reasons=(why,) if held else ())
    holders = _holders_of(objects, tensors, tracked, heap)
    if not unload.free_survivors:
        why = f"{format_bytes(held)}: not freed (free_survivors=False)"
        return holders, described, _Freed(held=held, reasons=(why,) if held else ())
    where = str(holders[0]) if holders else "holder not found"
    message = (
        f"{unload.name} was unloaded by vramkit but this reference outlived it "
        f"(held by: {where}); {unload.advice}"
    )
    if objects:  # the adapter makes the object and its modules refuse
        neutralised = adapter.neutralise(objects, message)
    else:
        # A kept submodule (FunASR's vad_model, a transformer block) refuses to be
        # called, as the model would; ones without tensors may be shared: left alone.
        neutralised = 0
        refuse_calls([m for m in tracked.live_modules() if owns_tensors(m)], message)
    result = free_storages(tracked.storages, message, survivors=tensors)
    objects.clear()
    tensors.clear()
    heap.clear()
    return (
        holders,
        described,
        _Freed(neutralised + result.freed_bytes, result.held_bytes, result.held),
    )


def _on_storages(heap: list[torch.Tensor], alive: dict[int, int]) -> list[torch.Tensor]:
    with torch._C.DisableTorchFunctionSubclass():
        return [t for t in heap if storage_key(t) in alive]


def _describe(
    objects: list[Any], tensors: list[torch.Tensor], tracked: Tracked, alive: dict[int, int]
) -> list[str]:
    found = [tracked.labels.get(id(obj), type(obj).__name__) for obj in objects]
    if alive:
        count = f"{len(tensors)} tensor{'s' if len(tensors) != 1 else ''}"
        found.append(f"{count} on {len(alive)} storages, {format_bytes(sum(alive.values()))}")
    return found


def _holders_of(
    objects: list[Any], tensors: list[torch.Tensor], tracked: Tracked, heap: list[torch.Tensor]
) -> tuple[ReferrerChain, ...]:
    """Referrer chains of the most telling survivors: the object first, then the largest tensor.

    One search for both, sharing each heap scan; a tensor held through the
    surviving object itself adds nothing, so its chains that start where the
    object's do are dropped.
    """
    largest = sorted(tensors, key=_storage_nbytes, reverse=True)[:1]
    targets = objects[:1] + largest if objects else largest
    if not targets:
        return ()
    modules = tracked.live_modules()
    chains = find_holders(
        targets,
        ignore=[objects, tensors, targets, heap, modules, largest],
        max_chains=3,
        modules=modules,
        heap_tensors=heap,
        first_only=True,
    )
    modules.clear()
    targets.clear()
    found: list[ReferrerChain] = []
    for chain in chains:
        if not any(chain.steps[0] == seen.steps[0] for seen in found):
            found.append(chain)
    return tuple(found)


def _storage_nbytes(tensor: torch.Tensor) -> int:
    return storage_bytes([tensor])


def await_driver(unload: Unload, after: DeviceMemory) -> DeviceMemory:
    """On drivers that free asynchronously, wait (bounded) until 75% of ``expected`` shows.

    ``after`` is the reading taken right after cleanup; returns the last reading.
    """
    before, expected = unload.before, unload.expected
    if unload.device.is_host or not expected or before.used_bytes is None:
        return after
    deadline = time.monotonic() + unload.driver_wait
    while time.monotonic() < deadline:
        if after.used_bytes is None or before.used_bytes - after.used_bytes >= 0.75 * expected:
            break
        time.sleep(0.25)
        after = unload.device.read()
    return after


def _weak(obj: object) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None
