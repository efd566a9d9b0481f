"""What a managed model tells whoever owns it (a ``ModelPool``): the contract between the two.

A model belongs to at most one owner. It asks the owner before a load or wake
(admission: the owner may wait for room, evict others, or refuse), tells it
how that load or wake ended, and tells it whenever it gives memory back or
goes idle (so that admissions waiting for room look again). Its keep-alive
expiry runs on the owner's scheduler. Nothing else passes between them.

:class:`Owned` is the model's side: joining and leaving an owner, telling it
when the model goes idle, the keep-alive expiry, and the advice a stale
reference's error gives (borrow through the pool, or through the model).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from vramkit._keepalive import default_scheduler
from vramkit.errors import InvalidArgumentError, ModelBusyError
from vramkit.model.reports import ModelState

if TYPE_CHECKING:
    from vramkit._keepalive import KeepAliveScheduler
    from vramkit.model._lease import StateMachine
    from vramkit.model.reports import UnloadReport

__all__ = ["ModelOwner", "Owned"]

M_contra = TypeVar("M_contra", contravariant=True)
T = TypeVar("T")


class ModelOwner(Protocol[M_contra]):
    """What a model needs of its owner; ``M_contra`` is the model's type (``ManagedModel``)."""

    @property
    def name(self) -> str:
        """The owner's name, for the model's status line and its errors' advice."""
        ...

    @property
    def _scheduler(self) -> KeepAliveScheduler:
        """The keep-alive scheduler the model's expiries run on while it is owned."""
        ...

    def _before_load(self, model: M_contra) -> None:
        """Admit a load or wake, in the loading thread, before it starts.

        Raises:
            BudgetExceededError: No room, even after waiting and evicting.
            ModelStateError: The owner is closed.
        """
        ...

    def _after_load(self, model: M_contra, *, ok: bool) -> None:
        """The load or wake admitted by :meth:`_before_load` ended (``ok``: it succeeded).

        Raises:
            BudgetExceededError: The model, measured, needs more than the whole
                budget: the owner unloaded it again.
        """
        ...

    def _freed(self, model: M_contra) -> None:
        """The model gave memory back (unloaded, offloaded) or its last lease ended."""
        ...

    def _idle_listener(self, model: M_contra) -> Callable[[], None]:
        """What the model's last lease end calls (lock-free): ``_freed(model)``, or its like."""
        ...


class Owned(Generic[T]):
    """A model's side of the contract: its owner, its idle moments, its keep-alive expiry."""

    _name: str
    _keep_alive: float | None
    _strict: bool
    _life: StateMachine[T]
    _owner: ModelOwner[Any] | None

    if TYPE_CHECKING:

        def _unload(self, waits: bool, timeout: float | None, strict: bool) -> UnloadReport: ...

        def _emit(self, kind: str, before: str, after: str, **fields: Any) -> None: ...

    def _join(self, owner: ModelOwner[Any]) -> None:
        """Belong to ``owner`` (a pool): its admissions, its keep-alive thread.

        Raises:
            InvalidArgumentError: The model belongs to another owner.
        """
        with self._life.cond:
            if self._owner is not None and self._owner is not owner:
                raise InvalidArgumentError(f"{self._name} already belongs to another pool")
            self._owner = owner
            self._listen()

    def _leave(self, owner: ModelOwner[Any]) -> bool:
        """Stop belonging to ``owner``, if the model is ``UNLOADED`` (a no-op for another owner).

        A lease through the pool takes no lock: it enters itself, sees the
        state ``READY``, then reads the owner. The owner changes only here,
        under the lock and while the model is unloaded, so such a lease either
        saw a state other than ``READY`` or read the owner from before the
        unload that preceded this: never a READY model that has left.

        Returns:
            ``False`` if the model is not ``UNLOADED`` (loaded again since the
            caller unloaded it): it still belongs to ``owner``; unload it again.
        """
        with self._life.cond:
            if self._owner is not owner:
                return True
            if self._life.state is not ModelState.UNLOADED:
                return False
            self._owner = None
            self._listen()
            return True

    def _listen(self) -> None:
        """Set who hears of the last lease ending (caller holds the lock, or is the constructor).

        The state machine calls it at every idle moment, lock-free: what the
        owner gives (the model is in the owner's members anyway), a
        keep-alive expiry through a weak reference (a model nobody holds still
        dies without the garbage collector).
        """
        life = self._life
        if self._keep_alive is not None:
            life.on_idle = _WentIdle(self)
        elif self._owner is not None:
            life.on_idle = self._owner._idle_listener(self)
        else:
            life.on_idle = None

    def _went_idle(self) -> None:
        """The last lease ended: a new stamp, then tell the owner and start the keep-alive."""
        stamp = self._life.went_idle()
        if stamp is not None:  # else a lease came in meanwhile: its end tells again
            self._idle(stamp)

    def _idle(self, stamp: int) -> None:
        """The last lease ended at ``stamp``: tell the owner, and start the keep-alive."""
        if self._owner is not None:
            self._owner._freed(self)
        self._schedule_expiry(stamp)

    def _schedule_expiry(self, stamp: int) -> None:
        delay = self._keep_alive
        if delay is None or self._life.closed:
            return
        owner = self._owner
        scheduler = owner._scheduler if owner is not None else default_scheduler()
        scheduler.schedule(self, delay, stamp)

    def _expire(self, stamp: int) -> None:
        """Unload if nothing happened since ``stamp`` (called by the keep-alive scheduler)."""
        life = self._life
        with life.cond:
            current = life.stamp == stamp and not life.count()
            settled = life.state in (ModelState.READY, ModelState.OFFLOADED)
        if not (current and settled):
            return
        try:
            report = self._unload(False, None, self._strict)
        except ModelBusyError:
            return  # a lease arrived in between: its end re-schedules the expiry
        self._emit(
            "expire",
            report.state_before.value,
            "UNLOADED",
            seconds=report.seconds,
            bytes=report.seen_bytes,
            detail={"reason": f"idle for {self._keep_alive} s"},
        )

    def _advice(self) -> str:
        """What a stale reference's error tells its user to do instead."""
        if self._owner is not None:
            way = f"`pool.use({self._name!r})` (pool {self._owner.name!r})"
        else:
            way = f"`{self._name}.use()`"
        return f"borrow it with {way} instead of keeping a reference"


class _WentIdle:
    """Calls a model's ``_went_idle`` while the model lives (held weakly)."""

    __slots__ = ("_model",)

    def __init__(self, model: Owned[Any]) -> None:
        self._model = weakref.ref(model)

    def __call__(self) -> None:
        model = self._model()
        if model is not None:
            model._went_idle()
