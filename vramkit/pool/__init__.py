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

import atexit
import collections
import concurrent.futures
import contextlib
import datetime
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Literal, TypeVar

from vramkit._keepalive import KeepAliveScheduler, keep_alive_seconds
from vramkit._units import check_flag, parse_bytes, parse_timeout
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import (
    InvalidArgumentError,
    ModelStateError,
    UnknownModelError,
)
from vramkit.model import ManagedModel
from vramkit.pool._admission import Admission, EvictTo
from vramkit.pool._budget import parse_budget
from vramkit.pool._eviction import Member, Plan
from vramkit.pool._lease import PoolLease, RetryOnce
from vramkit.pool._ledger import Ledger
from vramkit.pool._prefetch import Prefetcher
from vramkit.pool._report import PooledModel, PoolStatus

__all__ = ["ModelPool", "PoolStatus", "PooledModel", "live_pools"]

T = TypeVar("T")
R = TypeVar("R")

_pools: weakref.WeakSet[ModelPool] = weakref.WeakSet()
_pools_lock = threading.Lock()


def _checked(
    timeout: float | None, evict_to: object, name: object
) -> tuple[float | None, EvictTo, str]:
    """The constructor's ``timeout``, ``evict_to`` and ``name``, checked."""
    limit = parse_timeout(timeout)
    if evict_to not in ("auto", "cpu", "disk", "unload"):
        raise InvalidArgumentError(
            f"evict_to must be 'auto', 'cpu', 'disk' or 'unload'; got {evict_to!r}"
        )
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"name must be a non-empty string; got {name!r}")
    return limit, evict_to, name


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


class ModelPool(Admission):
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
        self._budget = parse_budget(budget)
        self._fixed_headroom = None if headroom is None else parse_bytes(headroom, what="headroom")
        self._keep_alive = keep_alive_seconds(keep_alive)
        self._timeout, self._evict_to, self._name = _checked(timeout, evict_to, name)
        self._lock = threading.Condition(threading.RLock())
        self._members: dict[str, Member] = {}
        self._reserved: dict[str, int] = {}  # loads and wakes in progress
        self._evicting: set[str] = set()
        self._sizing: str | None = None  # the one first load of unknown size in progress
        self._overshoot = False  # over budget after a load: fit again as leases return
        self._entering: collections.Counter[str] = collections.Counter()  # leases being taken
        self._leaving: set[str] = set()  # models being removed
        # Leases take the locked way (through _entering_model) while a model is
        # being removed or the pool is closed; read lock-free by every lease.
        self._gated = False
        self._plan = Plan()
        self._closed = False
        self._loads = 0
        self._evictions = 0
        self._peak = 0
        self._ledger = Ledger()
        self._waiting = 0
        self._scheduler = KeepAliveScheduler(
            f"vramkit-keepalive-{name}", clock=clock, start=start_threads
        )
        self._prefetcher = Prefetcher(name, self._room_without_waiting, self._entering_model)
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
            model._join(self)  # refuses a model another pool owns
            member = self._members[model.name] = Member(model, pin)
            self._ledger.add(model.name, member)
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
            self._gated = True
            while self._entering[name]:  # a lease or prefetch between its check and its lease
                self._lock.wait()
        try:
            self._unload_and_leave(model)
        except BaseException:
            with self._lock:
                self._leaving.discard(name)
                self._gated = bool(self._leaving) or self._closed
                self._lock.notify_all()
            raise
        with self._lock:
            self._leaving.discard(name)
            self._gated = bool(self._leaving) or self._closed
            del self._members[name]
            self._ledger.discard(name, model)
            self._lock.notify_all()
        return model

    def _unload_and_leave(self, model: ManagedModel[Any]) -> None:
        """Unload ``model`` and stop owning it; again if it was loaded in between.

        A model leaves only while ``UNLOADED``: a lease through the pool reads
        the owner after the state without a lock, and a READY model is then
        still the pool's (see ``Owned._leave``).
        """
        while True:
            model.unload(wait=True)
            if model._leave(self):
                return

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

    def use(self, name: str) -> PoolLease:
        """Borrow a model: ``with pool.use("asr") as model:`` (loads or wakes under the budget).

        If the block raises an out-of-memory error, the pool evicts every other
        idle model and cleans up before the error propagates, so a retry has
        room; :meth:`call` retries for you.
        """
        try:
            model = self._members[name].model
        except (KeyError, TypeError):
            model = self[name]  # raises, naming what the pool has
        if self._plan.pending:  # no plan (the usual case): not even a call
            self._plan.advance(name)
        return PoolLease(model, self)

    def call(self, name: str, fn: Callable[..., R], *args: Any, **kwargs: Any) -> R:
        """Run ``fn(model, *args, **kwargs)`` under a lease; on OOM, evict others and retry once.

        Returns:
            What ``fn`` returns.

        Raises:
            InvalidArgumentError: ``fn`` is not callable.
            Exception: The second out-of-memory error, as it was raised (its
                frames cleared, so that it pins none of the call's tensors).
        """
        if not callable(fn):
            raise InvalidArgumentError(
                f"fn must be a callable taking the model (and your arguments); got {fn!r}"
            )

        def attempt(_: int) -> R:
            with self.use(name) as model:
                return fn(model, *args, **kwargs)

        return RetryOnce(name, self._device).run(attempt)

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
        self._plan.replace(names)

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
            return self._prefetcher.submit(model)

    # ------------------------------------------------------------------ the budget

    def set_budget(self, budget: int | float | str | None) -> list[str]:
        """Change the budget now (same forms as the constructor's ``budget=``).

        If the pool is then over its new budget, idle models are evicted
        until it fits (leased ones cannot be: their loads are done).

        Returns:
            The names evicted to fit.
        """
        parsed = parse_budget(budget)
        with self._lock:
            self._check_open()
            self._budget = parsed
            self._lock.notify_all()
        return self._fit_budget(exclude="", reason="the budget shrank")

    def budget_bytes(self) -> int:
        """The budget now, in bytes (for ``budget=None``, recomputed from the driver)."""
        return self._budget_now()

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
            charged, peak = self._charged(), self._peak
            loads, evictions = self._loads, self._evictions
        try:
            budget = self.budget_bytes()
            headroom = self._headroom(self._whole_budget())
        except ModelStateError:
            budget = 0
            headroom = self._fixed_headroom if self._fixed_headroom is not None else 0
        models = tuple(PooledModel.of(m.model, m.pinned) for m in members)
        return PoolStatus(
            self._name,
            str(self._device),
            budget,
            charged,
            headroom,
            peak,
            models,
            loads,
            evictions,
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
            self._gated = True
            members = list(self._members.values())
            self._lock.notify_all()
        self._stop_threads()
        for member in members:
            self._unload_and_leave(member.model)

    def _stop_threads(self) -> None:
        self._scheduler.close()
        self._prefetcher.shutdown()

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
        return found + self._prefetcher.threads


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
