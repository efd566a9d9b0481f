"""``ModelPool``: several models, one memory budget.

A 12 GiB card cannot hold FunASR, a 7B LLM and a TTS model at once; used in
turns, it does not have to. Before a model loads (or wakes), the pool reserves
its expected size plus headroom and evicts idle models until it fits: to a
cheaper tier where host RAM allows (chosen from measured wake costs), else
unloaded; least recently used first (or, given a plan of what comes next,
the model needed furthest in the future); pinned models last; models with
leases never. If nothing can be evicted it waits, bounded, then raises
:class:`~vramkit.errors.BudgetExceededError` naming who holds what.

A model whose size nobody knows yet (no ``size_hint``, no checkpoint to
measure) loads alone: one such first load at a time, holding all the room the
budget has left until it is measured. If the pool is then over its budget it
evicts idle models until it fits again, at once or as the leases that pinned
them are returned; a model that alone needs more than the whole budget is
unloaded again and refused.

>>> import torch, vramkit
>>> pool = vramkit.ModelPool("cpu", budget="64MiB", headroom=0)
>>> pool.register("small", lambda: torch.nn.Linear(64, 64))
<ManagedModel 'small' UNLOADED on cpu, ?, 0 leases>
>>> with pool.use("small") as layer:
...     y = layer(torch.ones(1, 64))
>>> pool.close()
"""

from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import contextlib
import dataclasses
import datetime
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal, TypeVar

from vramkit import events
from vramkit._keepalive import KeepAliveScheduler, keep_alive_seconds
from vramkit._units import check_flag, format_bytes, format_part_of, parse_bytes, parse_timeout
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceLike, get_backend, resolve_device
from vramkit.errors import (
    BudgetExceededError,
    InvalidArgumentError,
    ModelBusyError,
    ModelStateError,
    OffloadError,
    UnknownModelError,
)
from vramkit.model import ManagedModel, ModelState
from vramkit.model._lease import Lease
from vramkit.oom import is_oom_error

__all__ = ["ModelPool", "PoolStatus", "PooledModel", "live_pools"]

T = TypeVar("T")
R = TypeVar("R")

EvictTo = Literal["auto", "cpu", "disk", "unload"]

# The default headroom: an eighth of the whole budget, at most 512 MiB (ComfyUI
# keeps about 0.8 GiB on large cards; activations stop growing with the card).
DEFAULT_HEADROOM_DIVISOR = 8
DEFAULT_HEADROOM_CAP = 512 * 1024**2

_log = logging.getLogger("vramkit.pool")
_pools: weakref.WeakSet[ModelPool] = weakref.WeakSet()
_pools_lock = threading.Lock()


def live_pools() -> list[ModelPool]:
    """Every open ``ModelPool`` in this process (for ``vramkit.status()``)."""
    with _pools_lock:
        return [p for p in _pools if not p.closed]


@atexit.register
def _close_pools_at_exit() -> None:
    # Stop keep-alive and prefetch threads before the interpreter tears down;
    # models are left to die with the process (no unload work at exit).
    for pool in live_pools():
        pool._stop_threads()


@dataclass(frozen=True, slots=True)
class PooledModel:
    """One model's line in :meth:`ModelPool.status`."""

    name: str
    state: str
    tier: str | None
    device_bytes: int
    size_bytes: int | None
    leases: int
    idle_seconds: float | None
    pinned: bool
    keep_alive: float | None


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A pool's accounting at one moment.

    Attributes:
        name: The pool's name.
        device: Its device.
        budget_bytes: The budget now (for ``budget=None``, the driver's free
            memory plus what the pool's models hold).
        charged_bytes: Bytes the pool counts against the budget: resident
            models plus reservations of loads in progress.
        headroom_bytes: Bytes kept free beyond each reservation.
        peak_charged_bytes: Highest ``charged_bytes`` seen.
        models: One :class:`PooledModel` per model, in registration order.
        loads: Loads and wakes the pool admitted.
        evictions: Models the pool evicted (offloaded or unloaded) to make room.
    """

    name: str
    device: str
    budget_bytes: int
    charged_bytes: int
    headroom_bytes: int
    peak_charged_bytes: int
    models: tuple[PooledModel, ...]
    loads: int
    evictions: int

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready data (bytes as ints, ``models`` as a list of dicts)."""
        # Not dataclasses.asdict: its deep copies cost more than the status itself.
        data = {name: getattr(self, name) for name in _POOL_FIELDS}
        data["models"] = [{name: getattr(m, name) for name in _MODEL_FIELDS} for m in self.models]
        return data

    def __str__(self) -> str:
        lines = [
            f"pool {self.name} on {self.device}: "
            f"{format_part_of(self.charged_bytes, max(self.budget_bytes, 1))} budget used "
            f"(peak {format_bytes(self.peak_charged_bytes)}, headroom "
            f"{format_bytes(self.headroom_bytes)}), {self.loads} loads, "
            f"{self.evictions} evictions"
        ]
        header = ("model", "state", "on device", "size", "leases", "idle", "keep-alive")
        rows = [header]
        for m in self.models:
            state = m.state + (f" ({m.tier})" if m.tier else "") + (" pinned" if m.pinned else "")
            rows.append(
                (
                    m.name,
                    state,
                    format_bytes(m.device_bytes),
                    format_bytes(m.size_bytes),
                    str(m.leases),
                    "-" if m.idle_seconds is None else f"{m.idle_seconds:.1f} s",
                    "never" if m.keep_alive is None else f"{m.keep_alive:g} s",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        return "\n".join(lines)


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(PooledModel))
_POOL_FIELDS = tuple(f.name for f in dataclasses.fields(PoolStatus) if f.name != "models")


@dataclass(slots=True)
class _Member:
    model: ManagedModel[Any]
    pinned: bool


class ModelPool:
    """Several :class:`~vramkit.ManagedModel` on one device under one memory budget.

    Args:
        device: The device the models share (default: the best available).
            On ``cpu`` the budget counts host RAM, so every rule works without a GPU.
        budget: ``None``: the driver's free memory at the time (on CUDA, NVML
            counts other processes), plus what the pool's own models hold. A
            float in (0, 1]: that fraction of the device's total. An int of
            bytes or a string such as ``"10GiB"``: exactly that.
        headroom: Bytes kept free beyond each model's reservation (activations,
            allocator slack). By default an eighth of the whole budget, at most
            512 MiB, so that a small budget still admits models that fit it.
        keep_alive: Default idle seconds for models registered through
            :meth:`register` (Ollama semantics: ``0`` unloads when idle, ``None``
            never).
        timeout: Seconds a load waits for leased models to be returned before
            raising :class:`BudgetExceededError`; ``None`` (or infinity) waits
            as long as it takes.
        evict_to: How to evict: ``"auto"`` (each model's cheapest tier from its
            measured costs), ``"cpu"``, ``"disk"`` or ``"unload"``.
        name: A name for reports and events.
        clock: Monotonic seconds for the keep-alive scheduler (tests pass a
            controllable clock together with ``start_threads=False``).
        start_threads: Run keep-alive expiry on a background thread. With
            ``False``, call :meth:`run_expiry` to expire due models.
    """

    def __init__(
        self,
        device: DeviceLike | None = None,
        *,
        budget: int | float | str | None = None,
        headroom: int | str | None = None,
        keep_alive: float | datetime.timedelta | None = None,
        timeout: float | None = 30.0,
        evict_to: EvictTo = "auto",
        name: str = "pool",
        clock: Callable[[], float] = time.monotonic,
        start_threads: bool = True,
    ) -> None:
        check_flag(start_threads, "start_threads")
        if not callable(clock):
            raise InvalidArgumentError(f"clock must be a callable returning seconds; got {clock!r}")
        self._device = resolve_device(device)
        self._budget = _parse_budget(budget)
        self._fixed_headroom = None if headroom is None else parse_bytes(headroom, what="headroom")
        self._keep_alive = keep_alive_seconds(keep_alive)
        self._timeout = parse_timeout(timeout)
        if evict_to not in ("auto", "cpu", "disk", "unload"):
            raise InvalidArgumentError(
                f"evict_to must be 'auto', 'cpu', 'disk' or 'unload'; got {evict_to!r}"
            )
        self._evict_to: EvictTo = evict_to
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"name must be a non-empty string; got {name!r}")
        self._name = name
        self._lock = threading.Condition(threading.RLock())
        self._members: dict[str, _Member] = {}
        self._reserved: dict[str, int] = {}  # loads and wakes in progress
        self._evicting: set[str] = set()
        self._sizing: str | None = None  # the one first load of unknown size in progress
        self._overshoot = False  # over budget after a load: fit again as leases return
        self._entering: collections.Counter[str] = collections.Counter()  # leases being taken
        self._leaving: set[str] = set()  # models being removed
        self._plan: collections.deque[str] = collections.deque()
        self._closed = False
        self._loads = 0
        self._evictions = 0
        self._peak = 0
        self._scheduler = KeepAliveScheduler(
            f"vramkit-keepalive-{name}", clock=clock, start=start_threads
        )
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        with _pools_lock:
            _pools.add(self)

    # ------------------------------------------------------------------ membership

    def register(
        self,
        name: str,
        loader: Callable[[], T],
        *,
        pin: bool = False,
        keep_alive: float | datetime.timedelta | Literal["pool"] | None = "pool",
        **options: Any,
    ) -> ManagedModel[T]:
        """Create a :class:`~vramkit.ManagedModel` on the pool's device and add it.

        Args:
            name: Unique within the pool.
            loader: Zero-argument callable returning the model (placed on the device).
            pin: Evict this model only after every unpinned one.
            keep_alive: Idle seconds before expiry; ``"pool"`` (default) takes
                the pool's default.
            **options: Passed to :class:`~vramkit.ManagedModel`.

        Returns:
            The new model.
        """
        check_flag(pin, "pin")
        alive = self._keep_alive if keep_alive == "pool" else keep_alive
        model = ManagedModel(loader, name=name, device=self._device, keep_alive=alive, **options)
        return self.add(model, pin=pin)

    def add(self, model: ManagedModel[T], *, pin: bool = False) -> ManagedModel[T]:
        """Put an existing model under this pool's budget (and its keep-alive thread).

        Raises:
            InvalidArgumentError: The model lives on another device, belongs to
                another pool, or its name is taken here.
        """
        if not isinstance(model, ManagedModel):
            raise InvalidArgumentError(f"model must be a ManagedModel; got {model!r}")
        check_flag(pin, "pin")
        if model.device != self._device:
            raise InvalidArgumentError(
                f"{model.name} lives on {model.device}; this pool manages {self._device}"
            )
        with self._lock:
            self._check_open()
            if model.name in self._members:
                raise InvalidArgumentError(f"a model named {model.name!r} is already in the pool")
            if model._owner is not None and model._owner is not self:
                raise InvalidArgumentError(f"{model.name} already belongs to another pool")
            model._owner = self
            model._scheduler = self._scheduler
            self._members[model.name] = _Member(model, pin)
            self._peak = max(self._peak, self._charged())
        return model

    def remove(self, name: str) -> ManagedModel[Any]:
        """Unload a model (waiting for its leases) and take it out of the pool.

        From the call on, the pool starts nothing new on the model: a prefetch
        still queued skips it, and a lease object made earlier with
        :meth:`use` raises :class:`~vramkit.errors.ModelStateError` instead of
        loading it. Leases already taken are waited for.

        Returns:
            The model, unloaded and free to join another pool.

        Raises:
            UnknownModelError: No model of that name (or it is being removed).
            ModelBusyError: Called from inside one of the model's own leases.
        """
        model = self[name]
        with self._lock:
            if name in self._leaving:
                raise UnknownModelError(f"{name!r} is already being removed from {self._name!r}")
            self._leaving.add(name)
            while self._entering[name]:  # a lease or prefetch between its check and its lease
                self._lock.wait()
        try:
            model.unload(wait=True)
        except BaseException:
            with self._lock:
                self._leaving.discard(name)
                self._lock.notify_all()
            raise
        with self._lock:
            self._leaving.discard(name)
            del self._members[name]
            with model._cond:  # leases check their pool under the model's lock
                model._owner = None
            model._scheduler = None
            self._lock.notify_all()
        return model

    def __getitem__(self, name: str) -> ManagedModel[Any]:
        if not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a model name (a str); got {name!r}")
        try:
            return self._members[name].model
        except KeyError:
            known = ", ".join(self._members) or "none"
            raise UnknownModelError(
                f"no model {name!r} in pool {self._name!r}; it has: {known}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._members

    def __iter__(self) -> Iterator[ManagedModel[Any]]:
        return iter([m.model for m in self._members.values()])

    def __len__(self) -> int:
        return len(self._members)

    @property
    def device(self) -> Device:
        """The pool's device."""
        return self._device

    @property
    def name(self) -> str:
        """The pool's name."""
        return self._name

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    # ------------------------------------------------------------------ leases

    def use(self, name: str) -> _PoolLease:
        """Borrow a model: ``with pool.use("asr") as model:`` (loads or wakes under the budget).

        If the block raises an out-of-memory error, the pool evicts every other
        idle model and cleans up before the error propagates, so a retry has
        room; :meth:`call` retries for you.
        """
        model = self[name]
        self._advance_plan(name)
        return _PoolLease(self, model)

    def call(self, name: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run ``fn(model, *args, **kwargs)`` under a lease; on OOM, evict others and retry once.

        Returns:
            What ``fn`` returns.

        Raises:
            InvalidArgumentError: ``fn`` is not callable.
        """
        if not callable(fn):
            raise InvalidArgumentError(
                f"fn must be a callable taking the model (and your arguments); got {fn!r}"
            )
        for attempt in (1, 2):
            try:
                with self.use(name) as model:
                    return fn(model, *args, **kwargs)
            except BaseException as exc:
                if attempt == 2 or not is_oom_error(exc):
                    raise
                events.emit(
                    events.Event(
                        "oom",
                        name,
                        str(self._device),
                        "READY",
                        "READY",
                        detail={"reason": "out of memory in a lease: evicted others, retrying"},
                    )
                )
        raise AssertionError("unreachable")  # pragma: no cover

    def plan(self, names: Iterable[str]) -> None:
        """Tell the pool the order models will be used in, for Belady eviction.

        With a plan, eviction picks the idle model needed furthest in the
        future (or never) instead of the least recently used. Each
        :meth:`use` of the model at the head of the plan consumes it.

        Raises:
            InvalidArgumentError: A name not in the pool.
        """
        names = _names(names, "names")
        unknown = [n for n in names if n not in self._members]
        if unknown:
            raise InvalidArgumentError(f"plan names models not in the pool: {unknown}")
        with self._lock:
            self._plan = collections.deque(names)

    def _advance_plan(self, name: str) -> None:
        if not self._plan:  # no plan (the usual case): no lock on the lease path
            return
        with self._lock:
            if self._plan and self._plan[0] == name:
                self._plan.popleft()

    # ------------------------------------------------------------------ prefetch

    def prefetch(self, name: str) -> concurrent.futures.Future[bool]:
        """Load or wake a model in the background, if the budget allows without waiting.

        Idle models may be evicted for it (never leased ones), so the next step
        of a pipeline starts warm while the current one runs.

        Returns:
            A future: ``True`` when the model is ready, ``False`` when the
            budget had no room now (nothing was loaded).
        """
        model = self[name]
        with self._lock:
            self._check_open()
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"vramkit-prefetch-{self._name}"
                )
            executor = self._executor
        return executor.submit(self._prefetch, model)

    def _prefetch(self, model: ManagedModel[Any]) -> bool:
        try:
            with self._entering_model(model):
                return self._prefetch_member(model)
        except ModelStateError as exc:  # removed (or the pool closed) since it was queued
            self._skipped(model, str(exc))
            return False

    def _prefetch_member(self, model: ManagedModel[Any]) -> bool:
        if model.state is ModelState.READY:
            return True
        if not self._room_without_waiting(model):
            self._skipped(model, "no room in the budget right now")
            return False
        try:
            model.load()
        except BudgetExceededError:
            return False
        events.emit(events.Event("prefetch", model.name, str(self._device), "UNLOADED", "READY"))
        return True

    def _skipped(self, model: ManagedModel[Any], reason: str) -> None:
        state = model.state.value
        events.emit(
            events.Event(
                "prefetch_skipped",
                model.name,
                str(self._device),
                state,
                state,
                detail={"reason": reason},
            )
        )

    def _room_without_waiting(self, model: ManagedModel[Any]) -> bool:
        with self._lock:
            if model.expected_bytes is None and self._sizing is not None:
                return False  # another first load of unknown size holds the room
            need = (model.expected_bytes or 0) + self._headroom(self._whole_budget())
            idle = sum(m.model.device_bytes for m in self._candidates(exclude=model.name))
            return need <= self._available(exclude=model.name) + idle

    # ------------------------------------------------------------------ the budget

    def set_budget(self, budget: int | float | str | None) -> list[str]:
        """Change the budget now (same forms as the constructor's ``budget=``).

        If the pool is then over its new budget, idle models are evicted
        until it fits (leased ones cannot be: their loads are done).

        Returns:
            The names evicted to fit.
        """
        parsed = _parse_budget(budget)
        with self._lock:
            self._check_open()
            self._budget = parsed
            self._lock.notify_all()
        return self._fit_budget(exclude="", reason="the budget shrank")

    def budget_bytes(self) -> int:
        """The budget now, in bytes (for ``budget=None``, recomputed from the driver)."""
        kind, value = self._budget
        if kind == "bytes":
            return int(value)
        reading = get_backend(self._device.kind).read(self._device.index or 0)
        if kind == "fraction":
            if reading.total_bytes is None:
                raise ModelStateError(f"{self._device} reports no total: use a budget in bytes")
            return int(reading.total_bytes * value)
        free = reading.free_bytes
        if free is None:
            raise ModelStateError(
                f"{self._device} reports no free memory (install the nvml extra?): "
                "give the pool a budget in bytes"
            )
        return int(free) + self._charged_resident()

    def _charged_resident(self, exclude: str = "") -> int:
        return sum(
            m.model.device_bytes
            for n, m in self._members.items()
            if n not in self._reserved and n != exclude
        )

    def _charged(self, exclude: str = "") -> int:
        return self._charged_resident(exclude) + sum(
            v for n, v in self._reserved.items() if n != exclude
        )

    def _available(self, exclude: str = "") -> int:
        """Room left for ``exclude`` (whose own bytes, if any, are not counted against it)."""
        kind, _ = self._budget
        if kind == "driver":
            reading = get_backend(self._device.kind).read(self._device.index or 0)
            own = self._members[exclude].model.device_bytes if exclude in self._members else 0
            return int(reading.free_bytes or 0) + own - sum(self._reserved.values())
        return self.budget_bytes() - self._charged(exclude)

    def _candidates(self, *, exclude: str) -> list[_Member]:
        """Idle, resident models that may be evicted, in eviction order."""
        idle = [
            m
            for n, m in self._members.items()
            if n != exclude
            and n not in self._evicting
            and n not in self._reserved
            and m.model.leases == 0
            and not m.model._lease_coming
            and m.model.state in (ModelState.READY, ModelState.OFFLOADED)
            and m.model.device_bytes > 0
        ]
        plan = list(self._plan)

        def next_use(member: _Member) -> float:
            try:
                return float(plan.index(member.model.name))
            except ValueError:
                return math.inf

        def key(member: _Member) -> tuple[bool, float, float]:
            last = member.model._last_used or 0.0
            if plan:  # Belady: furthest next use first
                return (member.pinned, -next_use(member), last)
            return (member.pinned, 0.0, last)  # least recently used first

        return sorted(idle, key=key)

    def _before_load(self, model: ManagedModel[Any]) -> None:
        """Admission, called by a member in its loading thread before its loader runs."""
        name = model.name
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        try:
            if model.expected_bytes is None:
                self._claim_sizing(model, deadline)
            while True:
                with self._lock:
                    victims = self._admit(model, deadline)
                    if victims is None:
                        return
                    self._evicting.update(v.model.name for v in victims)
                self._evict_all(victims, reason=f"making room for {name}")
        except BaseException:
            self._release_sizing(name)
            raise

    def _claim_sizing(self, model: ManagedModel[Any], deadline: float | None) -> None:
        """Wait for the one slot for a first load of unknown size, then evict every idle model.

        Nobody knows what such a load will take, so it loads alone, with all
        the room idle models can give.
        """
        name = model.name
        with self._lock:
            while self._sizing is not None and self._sizing != name:
                self._check_member(model)
                if not self._wait_for_room(deadline):
                    raise BudgetExceededError(
                        f"{name} (size unknown: give it a size_hint) waited "
                        f"{self._timeout:g} s for the first load of {self._sizing}, also of "
                        f"unknown size, in pool {self._name!r}"
                    )
            self._check_member(model)
            self._sizing = name
            victims = self._candidates(exclude=name)
            self._evicting.update(v.model.name for v in victims)
        if victims:
            self._evict_all(victims, reason=f"making room for {name} (size unknown)")

    def _release_sizing(self, name: str) -> None:
        with self._lock:
            if self._sizing == name:
                self._sizing = None
                self._lock.notify_all()

    def _admit(self, model: ManagedModel[Any], deadline: float | None) -> list[_Member] | None:
        """Reserve room for ``model`` (``None``), or pick victims to evict first (caller locks).

        Raises:
            BudgetExceededError: The model needs more than the whole budget,
                or no room came free before ``deadline``.
            ModelStateError: The pool closed or the model is being removed.
        """
        name = model.name
        while True:
            self._check_member(model)
            expected = model.expected_bytes
            whole = self._whole_budget()
            headroom = self._headroom(whole)
            need = (expected or 0) + headroom
            if need > whole:
                raise BudgetExceededError(self._too_big(name, need, whole))
            available = self._available(exclude=name)
            if need <= available:
                # Unknown size: hold all the room left, so nothing else is admitted
                # into bytes this load may turn out to need, until it is measured.
                reserve = max(available - headroom, 0) if expected is None else expected
                self._reserved[name] = reserve
                self._peak = max(self._peak, self._charged())
                if _log.isEnabledFor(logging.DEBUG):
                    _log.debug(
                        "pool %s admits %s: %s needed, %s available; %s",
                        self._name,
                        name,
                        need,
                        available,
                        self._describe_members(),
                    )
                return None
            picked = self._pick(need - available, exclude=name)
            if picked is not None:
                return picked
            if not self._wait_for_room(deadline):
                raise BudgetExceededError(self._no_room(name, need, available))

    def _wait_for_room(self, deadline: float | None) -> bool:
        """Wait (caller locks) for a change, a quarter second at most. False past ``deadline``."""
        remaining = 0.25 if deadline is None else deadline - time.monotonic()
        if remaining <= 0:
            return False
        self._lock.wait(min(remaining, 0.25))
        return True

    def _too_big(self, name: str, need: int, whole: int) -> str:
        headroom = self._headroom(whole)
        return (
            f"{name} needs {format_bytes(need)} ({format_bytes(need - headroom)}"
            f" + {format_bytes(headroom)} headroom) but the whole budget of "
            f"pool {self._name!r} is {format_bytes(whole)}"
        )

    def _evict_all(self, victims: list[_Member], *, reason: str) -> list[str]:
        """Evict ``victims`` (already marked in ``_evicting``) outside the pool lock."""
        evicted = []
        try:
            for victim in victims:
                if self._evict(victim.model, reason=reason):
                    evicted.append(victim.model.name)
        finally:
            with self._lock:
                self._evicting.difference_update(v.model.name for v in victims)
                self._lock.notify_all()
        return evicted

    def _describe_members(self) -> str:
        return ", ".join(
            f"{n} {m.model.state.value}"
            + (f"({m.model.tier})" if m.model.tier else "")
            + f" {self._reserved.get(n, m.model.device_bytes)}"
            for n, m in self._members.items()
        )

    def _whole_budget(self) -> int:
        kind, _ = self._budget
        if kind == "driver":
            reading = get_backend(self._device.kind).read(self._device.index or 0)
            total = reading.total_bytes
            if total is not None:
                return int(total)
        return self.budget_bytes()

    def _headroom(self, whole: int) -> int:
        """Bytes kept free beyond a reservation, for a pool whose whole budget is ``whole``.

        A fixed default would refuse everything under a budget smaller than
        itself, so the default scales with the budget and is capped where a
        large device's activations and allocator slack stop growing with it.
        """
        if self._fixed_headroom is not None:
            return self._fixed_headroom
        return min(DEFAULT_HEADROOM_CAP, whole // DEFAULT_HEADROOM_DIVISOR)

    def _pick(self, shortfall: int, *, exclude: str) -> list[_Member] | None:
        """The fewest idle models, in eviction order, whose eviction covers ``shortfall``."""
        chosen: list[_Member] = []
        freed = 0
        for member in self._candidates(exclude=exclude):
            if freed >= shortfall:
                break
            chosen.append(member)
            freed += member.model.device_bytes
        if freed < shortfall or not chosen:
            return None
        # Spare any victim the others already cover, the ones needed soonest first:
        # evicting a small model that does not close the gap only costs a reload.
        for member in reversed(list(chosen)):
            size = member.model.device_bytes
            if freed - size >= shortfall:
                chosen.remove(member)
                freed -= size
        return chosen

    def _no_room(self, name: str, need: int, available: int) -> str:
        holders = []
        for n, member in self._members.items():
            resident = self._reserved.get(n, member.model.device_bytes)
            if resident:
                why = (
                    f"{member.model.leases} leases"
                    if member.model.leases
                    else (
                        "loading" if n in self._reserved else "pinned" if member.pinned else "idle"
                    )
                )
                holders.append(f"{n} {format_bytes(resident)} ({why})")
        return (
            f"no room for {name} in pool {self._name!r} after waiting {self._timeout or 0:g} s: "
            f"needs {format_bytes(need)}, {format_bytes(max(available, 0))} free of "
            f"{format_bytes(self.budget_bytes())}; held by: {', '.join(holders) or 'nothing'}"
        )

    def _evict(self, model: ManagedModel[Any], *, reason: str) -> bool:
        """Offload or unload one idle model. Returns whether it freed its device bytes."""
        tier = self._evict_to
        if tier == "auto":
            tier = model.choose_tier()  # type: ignore[assignment]
        if tier == model.tier:
            tier = "unload"  # already there, and what it still holds is wanted: all of it
        before = model.state
        started = time.perf_counter()
        try:
            if tier in ("cpu", "disk"):
                try:
                    model.offload(tier)
                except OffloadError as exc:
                    # The tier could not be written (disk full...): the model is
                    # still READY and the room is still needed, so unload it.
                    # The error names the model already; say it once.
                    reason = str(exc).removeprefix(f"{model.name}: ")
                    events.logger.warning(
                        "%s: evicting to the %s tier failed (%s); unloading instead",
                        model.name,
                        tier,
                        reason,
                    )
                    tier = "unload"
                    model.unload()
            else:
                model.unload()
        except ModelBusyError:
            return False  # a lease arrived in between: it is not idle any more
        with self._lock:
            self._evictions += 1
        events.emit(
            events.Event(
                "evict",
                model.name,
                str(self._device),
                before.value,
                model.state.value,
                seconds=time.perf_counter() - started,
                bytes=model.size_bytes,
                detail={"tier": tier, "reason": reason},
            )
        )
        return True

    def evict_idle(self, *, exclude: Iterable[str] = ()) -> list[str]:
        """Evict every idle model now (after an out-of-memory error, say).

        Args:
            exclude: Names to keep.

        Returns:
            The names evicted.
        """
        keep = set(_names(exclude, "exclude"))
        with self._lock:
            victims = [m for m in self._candidates(exclude="") if m.model.name not in keep]
            self._evicting.update(v.model.name for v in victims)
        return self._evict_all(victims, reason="evict_idle")

    # hooks called by member models -----------------------------------------

    def _after_load(self, model: ManagedModel[Any], *, ok: bool) -> None:
        """A member's load or wake ended: its measured size replaces its reservation.

        Raises:
            BudgetExceededError: The model alone needs more than the whole
                budget; it was unloaded again (unless a lease got to it first).
        """
        name = model.name
        with self._lock:
            self._reserved.pop(name, None)
            if self._sizing == name:
                self._sizing = None
            if ok:
                self._loads += 1
            whole = self._whole_budget() if ok else 0
            need = (model.size_bytes or 0) + self._headroom(whole)
            self._peak = max(self._peak, self._charged())
            self._lock.notify_all()
        if ok and need > whole:
            with contextlib.suppress(ModelBusyError):  # leased already: evicted when returned
                model.unload()
            raise BudgetExceededError(self._too_big(name, need, whole) + "; it was unloaded")
        if ok:
            self._fit_budget(exclude=name, reason=f"{name} was larger than expected")

    def _fit_budget(self, *, exclude: str, reason: str) -> list[str]:
        """Evict idle models until the pool fits its budget again. Returns the names evicted.

        What cannot be evicted now (leased models) is evicted as its leases
        return: :meth:`_freed` calls back here while the pool is over.
        """
        with self._lock:
            over = 0 if self._closed else self._over_budget()
            self._overshoot = over > 0
            # Bytes already on their way out count as gone: evict nothing twice over.
            over -= sum(
                self._members[n].model.device_bytes for n in self._evicting if n in self._members
            )
            victims: list[_Member] = []
            if over > 0:
                victims = self._pick(over, exclude=exclude) or self._candidates(exclude=exclude)
                self._evicting.update(v.model.name for v in victims)
        return self._evict_all(victims, reason=reason) if victims else []

    def _over_budget(self) -> int:
        kind, _ = self._budget
        if kind == "driver":
            return 0  # the driver's own accounting already includes the load
        return self._charged() - self.budget_bytes()

    def _freed(self, model: ManagedModel[Any]) -> None:
        """A member unloaded, offloaded or went idle: wake admissions waiting for room."""
        with self._lock:
            self._lock.notify_all()
            overshoot = self._overshoot
        if overshoot:
            try:
                self._fit_budget(exclude="", reason="getting back under budget")
            except Exception:  # a lease's return must not fail for another model's eviction
                _log.exception("pool %s: evicting to fit the budget failed", self._name)

    def _check_member(self, model: ManagedModel[Any]) -> None:
        """Raise unless the pool is open and ``model`` is a member not being removed."""
        self._check_open()
        member = self._members.get(model.name)
        if member is None or member.model is not model or model.name in self._leaving:
            raise ModelStateError(f"{model.name} was removed from pool {self._name!r}")

    @contextlib.contextmanager
    def _entering_model(self, model: ManagedModel[Any]) -> Iterator[None]:
        """Mark a lease or prefetch in progress on a member, so ``remove()`` waits for it."""
        name = model.name
        with self._lock:
            self._check_member(model)
            self._entering[name] += 1
        try:
            yield
        finally:
            with self._lock:
                self._entering[name] -= 1
                if not self._entering[name]:
                    del self._entering[name]
                    self._lock.notify_all()

    # ------------------------------------------------------------------ status and lifetime

    def status(self) -> PoolStatus:
        """Each model's state, tier, bytes, leases and idle time, and the pool's accounting."""
        with self._lock:
            members = list(self._members.values())
            charged = self._charged()
            peak = self._peak
            loads, evictions = self._loads, self._evictions
        try:
            budget = self.budget_bytes()
            headroom = self._headroom(self._whole_budget())
        except ModelStateError:
            budget = 0
            headroom = self._fixed_headroom if self._fixed_headroom is not None else 0
        return PoolStatus(
            name=self._name,
            device=str(self._device),
            budget_bytes=budget,
            charged_bytes=charged,
            headroom_bytes=headroom,
            peak_charged_bytes=peak,
            models=tuple(
                PooledModel(
                    name=m.model.name,
                    state=m.model.state.value,
                    tier=m.model.tier,
                    device_bytes=m.model.device_bytes,
                    size_bytes=m.model.expected_bytes,
                    leases=m.model.leases,
                    idle_seconds=m.model.idle_seconds,
                    pinned=m.pinned,
                    keep_alive=m.model.keep_alive,
                )
                for m in members
            ),
            loads=loads,
            evictions=evictions,
        )

    def __str__(self) -> str:
        return str(self.status())

    def __repr__(self) -> str:
        return f"<ModelPool {self._name!r} on {self._device}, {len(self._members)} models>"

    def run_expiry(self) -> int:
        """Expire due keep-alive timers now, in this thread (for ``start_threads=False``)."""
        return self._scheduler.run_due()

    def close(self) -> None:
        """Unload every model (waiting for leases), stop the pool's threads. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            members = list(self._members.values())
            self._lock.notify_all()
        self._stop_threads()
        for member in members:
            member.model.unload(wait=True)
            member.model._owner = None
            member.model._scheduler = None

    def _stop_threads(self) -> None:
        self._scheduler.close()
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def _check_open(self) -> None:
        if self._closed:
            raise ModelStateError(f"pool {self._name!r} is closed")

    def __enter__(self) -> ModelPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @property
    def threads(self) -> list[threading.Thread]:
        """The pool's live background threads (keep-alive, prefetch)."""
        found = []
        thread = self._scheduler.thread
        if thread is not None and thread.is_alive():
            found.append(thread)
        prefix = f"vramkit-prefetch-{self._name}"
        found += [t for t in threading.enumerate() if t.name.startswith(prefix)]
        return found


class _PoolLease:
    """A lease taken through the pool: OOM inside the block evicts the others first."""

    __slots__ = ("_lease", "_model", "_pool")

    def __init__(self, pool: ModelPool, model: ManagedModel[Any]) -> None:
        self._pool = pool
        self._model = model
        self._lease = Lease(model, pool)

    def __enter__(self) -> Any:
        with self._pool._entering_model(self._model):
            return self._lease.__enter__()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._lease.__exit__(exc_type, exc, tb)
        if exc is not None and is_oom_error(exc):
            self._make_room()

    async def __aenter__(self) -> Any:
        with self._pool._entering_model(self._model):
            return await self._lease.__aenter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._lease.__aexit__(exc_type, exc, tb)
        if exc is not None and is_oom_error(exc):
            await asyncio.to_thread(self._make_room)  # unloading can take seconds

    def _make_room(self) -> None:
        """After an out-of-memory error in the block: evict the other idle models, clean up."""
        self._pool.evict_idle(exclude=[self._model.name])
        cleanup(self._model.device)


def _names(names: object, what: str) -> list[str]:
    """A list of model names from an iterable of strings (a lone string is a mistake)."""
    if isinstance(names, str) or not isinstance(names, Iterable):
        raise InvalidArgumentError(
            f"{what} must be an iterable of model names, such as a list of str; got {names!r}"
        )
    listed = list(names)
    wrong = [n for n in listed if not isinstance(n, str)]
    if wrong:
        raise InvalidArgumentError(f"{what} must hold model names (str); got {wrong[0]!r}")
    return listed


def _parse_budget(budget: int | float | str | None) -> tuple[str, float]:
    if budget is None:
        return ("driver", 0.0)
    if isinstance(budget, float) and not isinstance(budget, bool):
        if not 0 < budget <= 1:
            raise InvalidArgumentError(
                f"budget as a fraction of the device must be in (0, 1]; got {budget!r} "
                "(use bytes or a string like '10GiB' for an absolute budget)"
            )
        return ("fraction", budget)
    value = parse_bytes(budget, what="budget")
    if value == 0:
        raise InvalidArgumentError("budget must be more than 0 bytes")
    return ("bytes", float(value))
