"""A pool's admission rules: who may load, how much room it reserves, whom it evicts first.

Before a member loads or wakes, the pool reserves its expected size plus
headroom and evicts idle models until it fits (:meth:`Admission._admit`). A
model whose size nobody knows yet loads alone, holding all the room left until
it is measured (:meth:`Admission._claim_sizing`). A load that turns out larger
than expected puts the pool over its budget: idle models are evicted at once,
leased ones as their leases return (:meth:`Admission._fit_budget`, called back
from :meth:`Admission._freed`). These are the pool's side of the owner contract
with its models (:class:`vramkit.model._owner.ModelOwner`).

:class:`Admission` is a base of :class:`~vramkit.ModelPool`, which holds the
state it works on (declared here) and the membership it checks against.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

from vramkit._units import format_bytes
from vramkit.devices import Device
from vramkit.errors import BudgetExceededError, ModelBusyError, ModelStateError
from vramkit.model import ManagedModel, ModelState
from vramkit.pool._budget import Budget, Charges, headroom_bytes
from vramkit.pool._eviction import Member, Plan, describe, evict, fewest_covering, holders
from vramkit.pool._ledger import Ledger

__all__ = ["Admission", "EvictTo"]

EvictTo = Literal["auto", "cpu", "disk", "unload"]

_log = logging.getLogger("vramkit.pool")
_EVICTABLE = (ModelState.READY, ModelState.OFFLOADED)


class Admission:
    """The admission rules of a :class:`~vramkit.ModelPool` (see the module's docstring)."""

    # The pool's state these rules read and write; ModelPool.__init__ sets it.
    _device: Device
    _budget: Budget
    _fixed_headroom: int | None
    _timeout: float | None
    _evict_to: EvictTo
    _name: str
    _lock: threading.Condition
    _members: dict[str, Member]
    _reserved: dict[str, int]  # loads and wakes in progress
    _evicting: set[str]
    _sizing: str | None  # the one first load of unknown size in progress
    _overshoot: bool  # over budget after a load: fit again as leases return
    _plan: Plan
    _leaving: set[str]  # models being removed
    _closed: bool
    _loads: int
    _evictions: int
    _peak: int
    _ledger: Ledger  # each member's charge and place in the eviction order
    _waiting: int  # threads waiting for room: a lease's return notifies them

    def _check_open(self) -> None:
        if self._closed:
            raise ModelStateError(f"pool {self._name!r} is closed")

    def _check_member(self, model: ManagedModel[Any]) -> None:
        """Raise unless the pool is open and ``model`` is a member not being removed."""
        self._check_open()
        member = self._members.get(model.name)
        if member is None or member.model is not model or model.name in self._leaving:
            raise ModelStateError(f"{model.name} was removed from pool {self._name!r}")

    def _budget_now(self) -> int:
        """The budget now, in bytes (for ``budget=None``, recomputed from the driver)."""
        with self._lock:
            return self._budget.limit(self._device, self._charged_resident())

    def _room_without_waiting(self, model: ManagedModel[Any]) -> bool:
        with self._lock:
            if model.expected_bytes is None and self._sizing is not None:
                return False  # another first load of unknown size holds the room
            need = (model.expected_bytes or 0) + self._headroom(self._whole_budget())
            short = need - self._available(exclude=model.name)
            freed = 0
            for member in self._idle_in_order(exclude=model.name):
                if freed >= short:
                    break
                freed += member.model.device_bytes
            return freed >= short

    @staticmethod
    def _size(member: Member) -> int:
        return member.model.device_bytes

    def _settled(self) -> Ledger:
        """The ledger with every marked member settled (caller locks)."""
        ledger = self._ledger
        if ledger.dirty:
            ledger.settle(self._members)
        return ledger

    def _charged_resident(self, exclude: str = "") -> int:
        """What the members hold on the device, loads in progress and ``exclude`` left out."""
        ledger = self._settled()
        held = ledger.total - sum(ledger.charge(n) for n in self._reserved)
        if exclude not in self._reserved:
            held -= ledger.charge(exclude)
        return held

    def _charged(self, exclude: str = "") -> int:
        return self._charged_resident(exclude) + sum(
            v for n, v in self._reserved.items() if n != exclude
        )

    def _charges(self, exclude: str = "") -> Charges:
        """What the pool charges now; ``exclude`` names a model being admitted."""
        own = self._members[exclude].model.device_bytes if exclude in self._members else 0
        return Charges(
            self._charged_resident(), self._charged(exclude), own, sum(self._reserved.values())
        )

    def _available(self, exclude: str = "") -> int:
        """Room left for ``exclude`` (whose own bytes, if any, are not counted against it)."""
        return self._budget.room(self._device, self._charges(exclude))

    def _candidates(self, *, exclude: str) -> list[Member]:
        """Idle, resident models that may be evicted, in eviction order."""
        return list(self._idle_in_order(exclude=exclude))

    def _idle_in_order(self, *, exclude: str) -> Iterator[Member]:
        """:meth:`_candidates`, lazily: the ledger's order, members not idle now skipped."""
        ledger = self._settled()
        for member in ledger.ordered(self._members, self._plan.names()):
            model = member.model
            name = model.name
            if (
                name != exclude
                and name not in self._evicting
                and name not in self._reserved
                and model.leases == 0
                and not model._lease_coming
                and model.state in _EVICTABLE
                and model.device_bytes > 0
            ):
                yield member

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

    def _admit(self, model: ManagedModel[Any], deadline: float | None) -> list[Member] | None:
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
                        describe(self._members, self._reserved, self._size),
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
        # Counted, so that a lease's return notifies only when someone waits;
        # a member marked since the caller's decision is looked at again at once
        # (its return may have read the count before this wait raised it).
        self._waiting += 1
        try:
            if self._ledger.dirty:
                self._settled()
            else:
                self._lock.wait(min(remaining, 0.25))
        finally:
            self._waiting -= 1
        return True

    def _too_big(self, name: str, need: int, whole: int) -> str:
        headroom = self._headroom(whole)
        return (
            f"{name} needs {format_bytes(need)} ({format_bytes(need - headroom)}"
            f" + {format_bytes(headroom)} headroom) but the whole budget of "
            f"pool {self._name!r} is {format_bytes(whole)}"
        )

    def _evict_all(self, victims: list[Member], *, reason: str) -> list[str]:
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

    def _whole_budget(self) -> int:
        with self._lock:
            return self._budget.whole(self._device, self._charged_resident())

    def _headroom(self, whole: int) -> int:
        return headroom_bytes(self._fixed_headroom, whole)

    def _pick(self, shortfall: int, *, exclude: str) -> list[Member] | None:
        """The fewest idle models, in eviction order, whose eviction covers ``shortfall``."""
        return fewest_covering(self._idle_in_order(exclude=exclude), shortfall, self._size)

    def _no_room(self, name: str, need: int, available: int) -> str:
        held = holders(self._members, self._reserved, self._size)
        return (
            f"no room for {name} in pool {self._name!r} after waiting {self._timeout:g} s: "
            f"needs {format_bytes(need)}, {format_bytes(max(available, 0))} free of "
            f"{format_bytes(self._budget_now())}; held by: {held}"
        )

    def _evict(self, model: ManagedModel[Any], *, reason: str) -> bool:
        """Offload or unload one idle model. Returns whether it freed its device bytes."""
        evicted = evict(model, self._evict_to, reason=reason)
        if evicted:
            with self._lock:
                self._evictions += 1
        return evicted

    def _after_load(self, model: ManagedModel[Any], *, ok: bool) -> None:
        """A member's load or wake ended: its measured size replaces its reservation.

        Raises:
            BudgetExceededError: The model alone needs more than the whole
                budget; it was unloaded again (unless a lease got to it first).
        """
        name = model.name
        self._ledger.mark(model)
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
            victims: list[Member] = []
            if over > 0:
                victims = self._pick(over, exclude=exclude) or self._candidates(exclude=exclude)
                self._evicting.update(v.model.name for v in victims)
        return self._evict_all(victims, reason=reason) if victims else []

    def _over_budget(self) -> int:
        return self._budget.overdrawn(self._device, self._charges())

    def _freed(self, model: ManagedModel[Any]) -> None:
        """A member unloaded, offloaded or went idle: wake admissions waiting for room.

        At every lease's end: the member is marked in the ledger, and the lock
        is taken only when an admission waits or the pool is over its budget.
        """
        self._ledger.dirty[model] = None  # Ledger.mark, inlined
        if self._waiting or self._overshoot:
            self._wake()

    def _idle_listener(self, model: ManagedModel[Any]) -> Callable[[], None]:
        """What ``model``'s last lease end calls: :meth:`_freed` for it, bound, in one call."""
        return _IdleMark(self, model).freed

    def _wake(self) -> None:
        """After a mark: wake the admissions waiting for room, fit the budget if over it."""
        with self._lock:
            self._lock.notify_all()
            overshoot = self._overshoot
        if overshoot:
            try:
                self._fit_budget(exclude="", reason="getting back under budget")
            except Exception:  # a lease's return must not fail for another model's eviction
                _log.exception("pool %s: evicting to fit the budget failed", self._name)


class _IdleMark:
    """A member's :meth:`Admission._freed`, bound: called at every lease's end.

    A bound method costs a quarter less than a partial of ``_freed``, on the
    path every lease through the pool takes.
    """

    __slots__ = ("_dirty", "_model", "_pool")

    def __init__(self, pool: Admission, model: ManagedModel[Any]) -> None:
        self._pool = pool
        self._model = model
        self._dirty = pool._ledger.dirty  # the ledger keeps this one dict for its life

    def freed(self) -> None:
        self._dirty[self._model] = None  # as _freed does
        pool = self._pool
        if pool._waiting or pool._overshoot:
            pool._wake()
