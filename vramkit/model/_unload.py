"""Release and prove: drop a model, show with weak references that it died, free what did not.

An unload hands the object over in a one-item list that :func:`release_and_prove`
empties, so that no frame of the caller keeps the model alive through the
proof. Death is judged on the object, its native handles and its tensors; a
survivor is named (who holds it, as referrer chains) and, if asked, freed
anyway through its adapter. Then the device is cleaned and, on drivers that
free asynchronously, the driver's reading is awaited (bounded).
"""

from __future__ import annotations

import gc
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from vramkit._units import format_bytes
from vramkit._utils import clear_frames
from vramkit.adapters import Adapter
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceBackend, DeviceMemory
from vramkit.memory import DeviceMemoryDelta
from vramkit.model.reports import ModelState, UnloadReport
from vramkit.referrers import ReferrerChain, find_referrers

__all__ = ["Unload", "await_driver", "release_and_prove"]


@dataclass(frozen=True, slots=True)
class Unload:
    """One unload in progress: what :func:`release_and_prove` needs to know besides the object.

    Attributes:
        name: The model's name.
        device: Its device.
        backend: The device's backend, read before (``before``) and while
            waiting for the driver.
        before: The device's reading before anything was released.
        expected: Bytes the unload should give back on the device.
        free_survivors: Free what outlives the unload (see ``ManagedModel``).
        driver_wait: Seconds to wait for the driver to show the memory back.
        state_before: The model's state before the unload.
        started: ``time.perf_counter()`` when the unload was asked for.
        waited: Seconds spent waiting for leases.
    """

    name: str
    device: Device
    backend: DeviceBackend
    before: DeviceMemory
    expected: int | None
    free_survivors: bool
    driver_wait: float
    state_before: ModelState
    started: float
    waited: float


def release_and_prove(box: list[Any], adapter: Adapter, unload: Unload) -> UnloadReport:
    """Release the object in ``box`` (emptied), prove it died, free survivors, clean up.

    Raises:
        BaseException: A ``KeyboardInterrupt`` (or the like) during release,
            re-raised once the object is dropped and the device cleaned.
    """
    obj = box.pop()
    error: str | None = None
    interrupted: BaseException | None = None
    try:
        if obj is not None:
            adapter.release(obj)
    except Exception as exc:  # recorded and raised after the unload completes
        error = f"{type(exc).__name__}: {exc}"
        clear_frames(exc.__traceback__)  # the release's frames hold the model
    except BaseException as exc:  # KeyboardInterrupt: finish dropping, then re-raise
        error = f"{type(exc).__name__} during release"
        clear_frames(exc.__traceback__)
        interrupted = exc
    refs, verified, labels = _track(obj, adapter)
    obj = None  # the only strong reference vramkit had
    gc.collect()
    survivors = [ref() for ref in refs]
    survivors = [s for s in survivors if s is not None]
    holders: tuple[ReferrerChain, ...] = ()
    described: tuple[str, ...] = ()
    neutralised = 0
    if survivors:
        # Collected into lists first: a tuple filled from a generator must not be
        # seen by a heap walk before it is complete (see vramkit._gc).
        found = list(_holders_of(survivors))
        holders = tuple(found)
        described = tuple(list(_describe_survivors(survivors, labels)))  # noqa: C414
        if unload.free_survivors:
            message = (
                f"{unload.name} was unloaded by vramkit and its memory freed, but this "
                f"reference outlived it (held by: {holders[0] if holders else 'unknown'}); "
                f"borrow the model with `{unload.name}.use()` instead of keeping it"
            )
            neutralised = adapter.neutralise(survivors, message)
        survivors.clear()
        del survivors
        gc.collect()
    if interrupted is not None:
        # Stop promptly, but only after our reference is gone: the model is
        # UNLOADED (the caller's finally says so) and pins nothing of ours.
        cleanup(unload.device, gc_collect=False)
        raise interrupted.with_traceback(None)
    report_cleanup = cleanup(unload.device, gc_collect=False)  # collected just above
    cleaned = report_cleanup.after.readings[0]
    after = await_driver(unload, cleaned)
    return UnloadReport(
        model=unload.name,
        device=str(unload.device),
        state_before=unload.state_before,
        state_after=ModelState.UNLOADED,
        died=not described,
        verified=verified,
        holders=holders,
        survivors=described,
        neutralised_bytes=neutralised,
        expected_bytes=unload.expected,
        freed_bytes=DeviceMemoryDelta.between(unload.before, after).freed(),
        memory_before=unload.before,
        memory_after=after,
        cleanup=report_cleanup,
        waited_seconds=unload.waited,
        seconds=time.perf_counter() - unload.started,
        error=error,
    )


def await_driver(unload: Unload, after: DeviceMemory) -> DeviceMemory:
    """On drivers that free asynchronously, wait (bounded) until 75% of ``expected`` shows.

    ``after`` is the reading taken right after cleanup; returns the last reading.
    """
    before, expected = unload.before, unload.expected
    if unload.device.kind == "cpu" or not expected or before.used_bytes is None:
        return after
    deadline = time.monotonic() + unload.driver_wait
    while time.monotonic() < deadline:
        if after.used_bytes is None or before.used_bytes - after.used_bytes >= 0.75 * expected:
            break
        time.sleep(0.25)
        after = unload.backend.read(unload.device.index or 0)
    return after


def _weak(obj: object) -> weakref.ref[Any] | None:
    try:
        return weakref.ref(obj)
    except TypeError:
        return None


def _track(obj: object, adapter: Adapter) -> tuple[list[weakref.ref[Any]], bool, dict[int, str]]:
    """Weak references to ``obj``, its native handles and its tensors, with labels."""
    if obj is None:
        return [], True, {}
    refs: list[weakref.ref[Any]] = []
    labels: dict[int, str] = {}
    verified = True
    candidates: list[tuple[object, str]] = [(obj, type(obj).__name__)]
    candidates += [(h, f"native {type(h).__name__}") for h in adapter.handles(obj)]
    candidates += [(t, "tensor") for t in adapter.tensors(obj)]
    for candidate, label in candidates:
        ref = _weak(candidate)
        if ref is None:
            verified = verified and candidate is not obj
            continue
        refs.append(ref)
        labels[id(candidate)] = label
    return refs, verified, labels


def _describe_survivors(survivors: list[Any], labels: dict[int, str]) -> Iterator[str]:
    tensors = [s for s in survivors if isinstance(s, torch.Tensor)]
    for survivor in survivors:
        if not isinstance(survivor, torch.Tensor):
            yield labels.get(id(survivor), type(survivor).__name__)
    if tensors:
        from vramkit.adapters._torch_util import storage_bytes

        yield f"{len(tensors)} tensors, {format_bytes(storage_bytes(tensors))}"


def _holders_of(survivors: list[Any]) -> Iterator[ReferrerChain]:
    """Referrer chains of the most telling survivors: an object first, then the largest tensor."""
    objects = [s for s in survivors if not isinstance(s, torch.Tensor)]
    tensors = sorted(
        (s for s in survivors if isinstance(s, torch.Tensor) and not s.is_meta),
        key=lambda t: t.untyped_storage().nbytes(),
        reverse=True,
    )
    targets = objects[:1] + tensors[:1] if objects else tensors[:2]
    seen: set[tuple[str, ...]] = set()
    roots: set[str] = set()
    for target in targets:
        for chain in find_referrers(target, ignore=[survivors, targets], max_chains=3):
            # A tensor held through the surviving module itself adds nothing new.
            if chain.steps in seen or (target is not targets[0] and chain.steps[0] in roots):
                continue
            seen.add(chain.steps)
            roots.add(chain.steps[0])
            yield chain
