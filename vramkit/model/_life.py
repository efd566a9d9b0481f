"""How a managed model does each step of its life: the machinery under ``ManagedModel``.

:class:`~vramkit.model.ManagedModel` is the life of one model as its users see
it, each step documented: load, lease, offload, wake, unload, close.
:class:`ModelLife`, one of its base classes, is how each step is done: the state
machine claimed and settled (:mod:`vramkit.model._lease`), the owner's
admission asked (:mod:`vramkit.model._owner`), the weights parked
(:mod:`vramkit.model._parking`), the object released and proven dead
(:mod:`vramkit.model._unload`), the keep-alive scheduled, every transition
emitted as an event. A failed step leaves the model in the settled state it
started from (or ``UNLOADED``), with the owner's room given back.
"""

from __future__ import annotations

import time
import weakref
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from vramkit import events
from vramkit._gc import collect
from vramkit._oomerrors import is_oom_error
from vramkit._utils import clear_frames
from vramkit.adapters import Adapter, adapter_for
from vramkit.adapters._checkpoint import checkpoint_bytes
from vramkit.cleaning import cleanup
from vramkit.devices import Device
from vramkit.errors import (
    ModelStateError,
    VramLeakError,
    WorkerCrashedError,
)
from vramkit.memory import grown_bytes
from vramkit.model import tiers
from vramkit.model._lease import StateMachine
from vramkit.model._loader import check_loaded, remember
from vramkit.model._owner import ModelOwner, Owned
from vramkit.model._parking import Parking
from vramkit.model._unload import Unload, release_and_prove
from vramkit.model.reports import LoadReport, ModelState, ModelStats, UnloadReport

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from vramkit.cleaning import CleanupPolicy, CleanupTracker
    from vramkit.model.tiers import OffloadReport, Tier, WakeReport

__all__ = ["ModelLife"]

T = TypeVar("T")


class ModelLife(Owned[T]):
    """The machinery of one model's life; :class:`~vramkit.model.ManagedModel` is its face.

    A subclass sets the settings (loader, name, device...) before calling
    ``__init__``, which adds the state every step works on.
    """

    _loader: Callable[[], T]
    _name: str
    _device: Device
    _keep_alive: float | None
    _adapter_override: Adapter | None
    _strict: bool
    _free_survivors: bool
    _owns: bool
    _driver_wait: float
    _policy: CleanupPolicy | None
    _offload_dir: Path | None
    _size_hint: int | None
    _config: Mapping[str, Any]

    def __init__(self) -> None:
        self._adapter: Adapter | None = None
        self._tracker: CleanupTracker | None = None
        self._life: StateMachine[T] = StateMachine(self._name)  # state, object, leases
        self._parked = Parking()  # where the weights are while OFFLOADED
        self._stats = ModelStats()  # last_used excepted: the state machine keeps it
        self._owner: ModelOwner[Any] | None = None  # a pool, through _join
        self._last: weakref.ref[Any] | None = None  # the object of the last load, if alive
        self._listen()  # a keep-alive hears of idle moments (an owner, once it joins)

    # ------------------------------------------------------------------ load

    def _do_load(self) -> LoadReport:
        """Run the loader. The lifecycle is LOADING, this thread busy on it."""
        started = time.perf_counter()
        owner = self._owner
        obj: Any = None
        try:
            if owner is not None:
                owner._before_load(self)  # the pool's admission: may wait, may refuse
            before = self._device.read()
            threads = torch.get_num_threads()
            obj = self._loader()
            if torch.get_num_threads() != threads:  # loaders like FunASR's change it globally
                torch.set_num_threads(threads)
            adapter = self._adapter_override or adapter_for(obj)
            after = self._device.read()
            size = adapter.size_bytes(obj)
            check_loaded(self._name, self._loader, obj, adapter, size, self._last, self._owns)
            if size is None:
                size = loaded_bytes(grown_bytes(before, after), checkpoint_bytes(self._config))
        except BaseException as exc:
            # The failed load's frames hold whatever it built: clear them so a
            # half-built model does not stay alive through the traceback.
            obj = None
            clear_frames(exc.__traceback__)
            self._failed(ModelState.UNLOADED, admitted=owner is not None)
            self._emit(
                "load_failed",
                "LOADING",
                "UNLOADED",
                seconds=time.perf_counter() - started,
                detail={"error": f"{type(exc).__name__}: {exc}"},
            )
            raise
        seconds = time.perf_counter() - started
        self._last = remember(obj)
        life = self._life
        with life.cond:
            life.obj = obj
            life.last_used = time.monotonic()
            self._adapter = adapter
            self._stats = replace(
                self._stats, loads=self._stats.loads + 1, load_seconds=seconds, size_bytes=size
            )
            stamp = life.settle(ModelState.READY)
        obj = None  # the model holds it now; a pool refusing it must be able to free it
        if owner is not None:
            owner._after_load(self, ok=True)
        report = LoadReport(self._name, str(self._device), seconds, size, before, after)
        self._emit(
            "load",
            "UNLOADED",
            "READY",
            seconds=seconds,
            memory_before=before,
            memory_after=after,
            bytes=size,
            detail={"adapter": adapter.name},
        )
        self._schedule_expiry(stamp)
        return report

    def _failed(self, state: ModelState, *, admitted: bool) -> None:
        """A load, wake or offload failed: back to the settled ``state``, its room given back."""
        with self._life.cond:
            self._life.revert(state)
        if admitted and self._owner is not None:
            self._owner._after_load(self, ok=False)
        cleanup(self._device)

    # ------------------------------------------------------------------ offload tiers

    def _do_wake(self) -> WakeReport:
        """Bring an offloaded model back. The lifecycle is WAKING, this thread busy on it."""
        parked, owner = self._parked, self._owner
        tier = parked.tier or "cpu"
        started = time.perf_counter()
        if parked.rebuilds:
            return self._wake_by_loading(tier, None, started)
        try:
            if owner is not None:
                owner._before_load(self)  # the pool's admission: may wait, may refuse
        except BaseException:
            self._failed(ModelState.OFFLOADED, admitted=False)
            raise
        try:
            report = parked.unpark(self._name, self._device)
        except Exception as exc:
            if isinstance(exc, WorkerCrashedError):
                with self._life.cond:
                    self._lost()  # its worker died: nothing is left to wake
                self._failed(ModelState.UNLOADED, admitted=True)
                raise
            if tier != "disk" or is_oom_error(exc):
                self._failed(ModelState.OFFLOADED, admitted=True)  # stay offloaded
                raise
            # A cache file deleted, changed or replaced behind our back: the
            # loader still knows how to build the model. Say so, loudly.
            if owner is not None:
                owner._after_load(self, ok=False)
            events.logger.warning(
                "%s: the disk tier could not be read or trusted (%s: %s); "
                "reloading with the loader",
                self._name,
                type(exc).__name__,
                exc,
            )
            return self._wake_by_loading(tier, f"{type(exc).__name__}: {exc}", started)
        except BaseException:
            self._failed(ModelState.OFFLOADED, admitted=True)  # interrupted: stay offloaded
            raise
        life = self._life
        with life.cond:
            life.last_used = time.monotonic()
            self._woke(tier, report.seconds)
            stamp = life.settle(ModelState.READY)
        if owner is not None:
            owner._after_load(self, ok=True)
        self._emit(
            "wake",
            "OFFLOADED",
            "READY",
            seconds=report.seconds,
            bytes=report.weight_bytes,
            detail={"tier": tier, "method": report.method},
        )
        self._schedule_expiry(stamp)
        return report

    def _wake_by_loading(self, tier: str, fallback: str | None, started: float) -> WakeReport:
        """Wake by running the loader: the tier cannot restore (rebuild, or a broken file)."""
        life = self._life
        with life.cond:
            box = [life.obj]
            life.obj = None
            life.state = ModelState.LOADING
        self._parked.release()
        self._parked.clear()
        box.clear()
        collect()
        load = self._do_load()
        report = tiers.WakeReport(
            self._name,
            tiers.check_tier(tier),
            "rebuild" if fallback is None else "file",
            time.perf_counter() - started,
            load.size_bytes or 0,
            fallback=fallback,
        )
        with life.cond:
            self._woke(tier, report.seconds)
        return report

    def _object_lost(self, obj: object, error: BaseException) -> None:
        """The loaded object died on its own (its worker process crashed): now UNLOADED.

        Leases still out keep their (dead) object and fail when they use it;
        the next lease loads afresh.
        """
        life = self._life
        with life.cond:
            before = life.state
            if life.obj is not obj or before not in (ModelState.READY, ModelState.OFFLOADED):
                return  # already replaced, or a transition in progress handles it
            self._lost()
            life.settle(ModelState.UNLOADED)
        if self._owner is not None:
            self._owner._freed(self)
        self._emit(
            "crash",
            before.value,
            "UNLOADED",
            bytes=self._stats.size_bytes,
            detail={"error": str(error).partition("\n")[0]},
        )

    def _lost(self) -> None:
        """Forget an object that died on its own (an isolated model's worker crashed).

        The caller holds the lock.
        """
        self._life.obj = None
        self._parked.clear()

    def _woke(self, tier: str, seconds: float) -> None:
        stats = self._stats
        self._stats = replace(
            stats, wakes=stats.wakes + 1, wake_seconds={**stats.wake_seconds, tier: seconds}
        )

    def _offload(
        self, chosen: Tier, waits: bool, timeout: float | None, rewrite: bool
    ) -> OffloadReport:
        """Offload to ``chosen`` (see :meth:`ManagedModel.offload`), arguments checked."""
        parked, life = self._parked, self._life
        with life.cond:
            state = parked.state
            if life.state is ModelState.OFFLOADED and state is not None and state.tier == chosen:
                return tiers.OffloadReport(
                    self._name, chosen, state.method, 0.0, 0, note=f"already offloaded to {chosen}"
                )
        state_before = life.claim(wait=waits, timeout=timeout, action="offload")
        if state_before is ModelState.UNLOADED:
            raise ModelStateError(f"{self._name} is not loaded: nothing to offload")
        if state_before is ModelState.OFFLOADED and parked.wakes_before_moving_to(chosen):
            # disk -> cpu, or a dropped object: wake first, then offload where asked.
            with life.cond:
                life.state = ModelState.WAKING
            self._do_wake()
            return self._offload(chosen, waits, timeout, rewrite)
        with life.cond:
            box = [life.obj]
            life.obj = None
        directory = self._offload_dir or tiers.default_offload_dir()
        adapter = self._adapter_override or self._adapter
        owner = tiers.Owner(self._name, self._device, adapter, self._stats.size_bytes)
        try:
            message = (
                f"{self._name} is offloaded to {chosen} by vramkit: this reference "
                f"cannot run it until it wakes; {self._advice()}"
            )
            report = parked.park(owner, box[0], chosen, directory, message, rewrite=rewrite)
        except BaseException as exc:
            with life.cond:  # nothing changed: the model is as it was...
                life.obj = box.pop()
                if isinstance(exc, WorkerCrashedError):  # ...unless its worker died
                    self._lost()
                    state_before = ModelState.UNLOADED
                life.revert(state_before)
            raise
        assert parked.state is not None
        # A dropped object is rebuilt by the loader (the cleanup below collects it).
        dropped = remember(box[0]) if parked.state.method == "rebuild" else None
        residue = self._stats.offload_residue_bytes
        if parked.state.method == "delegated" and adapter is not None:
            # The object offloaded itself and stays: measure what it still holds.
            residue = {**residue, chosen: adapter.size_bytes(box[0]) or 0}
        with life.cond:
            life.obj = None if dropped is not None else box.pop()
            box.clear()
            self._stats = replace(
                self._stats,
                offloads=self._stats.offloads + 1,
                offloaded_bytes={**self._stats.offloaded_bytes, chosen: report.weight_bytes},
                offload_seconds={**self._stats.offload_seconds, chosen: report.seconds},
                offload_residue_bytes=residue,
            )
            stamp = life.settle(ModelState.OFFLOADED)
        cleaned = cleanup(self._device, gc_collect=parked.rebuilds)
        if dropped is not None and dropped() is not None:
            self._neutralise_dropped(dropped(), chosen)
            cleaned = cleanup(self._device, gc_collect=False)
        report = replace(report, memory_after=cleaned.after.readings[0])
        if self._owner is not None:
            self._owner._freed(self)
        self._emit(
            "offload",
            state_before.value,
            "OFFLOADED",
            seconds=report.seconds,
            memory_before=report.memory_before,
            memory_after=report.memory_after,
            bytes=report.weight_bytes,
            detail={"tier": chosen, "method": report.method},
        )
        self._schedule_expiry(stamp)
        return report

    def _neutralise_dropped(self, survivor: object, tier: str) -> None:
        """A dropped (rebuild-tier) object that something still holds: free it, make it loud.

        A wake builds a new object, so the old one is never coming back.
        """
        adapter = self._adapter_override or self._adapter
        if adapter is None or not self._owns or not self._free_survivors:
            return
        message = (
            f"{self._name} was offloaded to {tier} by vramkit (dropped, to be rebuilt at the "
            f"next lease) but this reference outlived it; {self._advice()}"
        )
        adapter.neutralise([survivor], message)

    # ------------------------------------------------------------------ unload

    def _unload(self, waits: bool, timeout: float | None, strict: bool) -> UnloadReport:
        """Unload (see :meth:`ManagedModel.unload`), arguments checked."""
        started = time.perf_counter()
        life = self._life
        state_before = life.claim(wait=waits, timeout=timeout, action="unload")
        waited = time.perf_counter() - started
        if state_before is ModelState.UNLOADED:
            return UnloadReport(
                self._name,
                str(self._device),
                ModelState.UNLOADED,
                ModelState.UNLOADED,
                died=True,
                verified=True,
                waited_seconds=waited,
            )
        # The object travels in a one-item list that release_and_prove empties:
        # a local variable here would keep it alive through the proof of death.
        with life.cond:
            box = [life.obj]
            life.obj = None
        try:
            report = self._release_and_prove(box, state_before, started, waited)
        finally:
            box.clear()
            with life.cond:
                self._parked.clear()
                life.revert(ModelState.UNLOADED)
            if self._owner is not None:
                self._owner._freed(self)
        self._emit(
            "unload",
            state_before.value,
            "UNLOADED",
            seconds=report.seconds,
            memory_before=report.memory_before,
            memory_after=report.memory_after,
            bytes=report.seen_bytes,
            # The chains themselves, not just a count: a subscriber that only sees events
            # (a serving framework's log) must be able to say who kept the model alive.
            detail={
                "died": report.died,
                "holders": len(report.holders),
                "held_by": tuple(str(chain) for chain in report.holders),
                "neutralised_bytes": report.neutralised_bytes,
            },
        )
        if report.error is not None:
            error = ModelStateError(
                f"{self._name}: releasing the model failed ({report.error}); it is UNLOADED "
                "and vramkit dropped its reference anyway"
            )
            error.report = report  # type: ignore[attr-defined]
            raise error
        if strict and not report.died:
            leak = VramLeakError(f"{self._name} survived unloading:\n{report}")
            leak.report = report  # type: ignore[attr-defined]
            raise leak
        return report

    def _release_and_prove(
        self,
        box: list[Any],
        state_before: ModelState,
        started: float,
        waited: float,
    ) -> UnloadReport:
        before = self._device.read()
        adapter = self._adapter_override or self._adapter or adapter_for(box[0])
        tier = self._parked.tier
        self._parked.release()  # host copies, pinned memory, cache files
        expected = self._stats.size_bytes
        if state_before is ModelState.OFFLOADED and (tier == "disk" or not self._device.is_host):
            expected = 0  # the weights already left the device when it was offloaded
        report = release_and_prove(
            box,
            adapter,
            Unload(
                name=self._name,
                device=self._device,
                before=before,
                expected=expected,
                free_survivors=self._free_survivors,
                owns=self._owns,
                advice=self._advice(),
                driver_wait=self._driver_wait,
                state_before=state_before,
                started=started,
                waited=waited,
            ),
        )
        with self._life.cond:
            self._stats = replace(self._stats, unloads=self._stats.unloads + 1)
        return report

    def _emit(self, kind: str, before: str, after: str, **fields: Any) -> None:
        """Log the transition and hand it to subscribers (see :mod:`vramkit.events`)."""
        events.emit(events.Event(kind, self._name, str(self._device), before, after, **fields))


def loaded_bytes(grown: int | None, weights: int | None) -> int | None:
    """A model's size from the memory its load added, at least its weight files' bytes.

    The difference undercounts when the load reuses pages the process already
    held (an allocator's free lists, an arena another model left), so the
    weight files, where they are known, are the floor.
    """
    if weights is None:
        return grown
    return weights if grown is None else max(grown, weights)
