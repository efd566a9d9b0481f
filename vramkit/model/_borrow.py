"""How a managed model lends itself out: leases, sync and async, taken through its life.

A lease on a ``READY`` model is counted by the state machine
(:mod:`vramkit.model._lease`); on any other model it first loads or wakes it
(or waits for the thread that does). An async lease is owned by its asyncio
task and taken in the event loop's thread, while the load it may need runs in
a worker thread that takes no lease: a cancelled task leaves none behind. A
lease through a pool is refused once the model has left that pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeVar

from vramkit.errors import ModelStateError
from vramkit.model._lease import new_token
from vramkit.model._life import ModelLife
from vramkit.model.reports import ModelState

if TYPE_CHECKING:
    from collections.abc import Callable

    from vramkit.cleaning import CleanupTracker

__all__ = ["Borrowing"]

T = TypeVar("T")

_LEASE_REENTERED = (
    "{name}: a lease was requested while this thread is {doing} the model "
    "(a loader or release that uses the model it is building?)"
)


class Borrowing(ModelLife[T]):
    """The leases of one model: what ``use()``, ``@inference`` and ``mm(...)`` borrow through."""

    def _acquire(self) -> tuple[T, int]:
        """Take a lease, loading or waking first if needed. Returns the object and a token."""
        token = new_token()
        obj = self._life.take(token)  # no lock on a READY model
        if obj is not None:
            return obj, token
        return self._acquire_slow(None)

    def _acquire_slow(self, pool: object, held: int = 0) -> tuple[T, int]:
        """A lease the lock-free way could not take: load, wake or wait, under the lock.

        Args:
            pool: The pool the lease is taken through: refused if the model
                left it meanwhile.
            held: The token of a lock-free lease to give back first (it was
                taken on a model no longer in ``pool``).
        """
        life = self._life
        if held:
            life.put_back(held)
        with life.lock:
            life.acquiring += 1
        try:
            while True:
                with life.cond:
                    state = life.claim_to_load(_LEASE_REENTERED, check=self._member_of(pool))
                    if state is ModelState.READY:
                        return life.grant()
                self._load_claimed(state)
        finally:
            with life.lock:
                life.acquiring -= 1

    @property
    def _lease_coming(self) -> bool:
        """Whether a thread is taking a lease through a load or wake (not to be evicted)."""
        return self._life.acquiring > 0

    def _try_acquire(self, task: object, pool: object) -> tuple[T, int] | None:
        """A lease for ``task`` if the model is ready now, without waiting; else ``None``.

        Async leases take their lease here, in the event loop's thread, owned by
        the task; the loading happens in a worker thread (:meth:`_ensure_ready`)
        that takes no lease, so a cancelled task leaves none behind.
        """
        life = self._life
        with life.lock:
            life.check_open()
            if pool is not None and self._owner is not pool:
                raise self._removed(pool)
            if life.state is ModelState.READY:
                return life.grant(task)
        return None

    def _ensure_ready(self, pool: object = None) -> None:
        """Load or wake the model (or wait for another thread to) without taking a lease."""
        while True:
            with self._life.cond:
                state = self._life.claim_to_load(_LEASE_REENTERED, check=self._member_of(pool))
            if state is ModelState.READY:
                return
            self._load_claimed(state)

    def _load_claimed(self, state: ModelState) -> None:
        """Run the load (from ``UNLOADED``) or wake (from ``OFFLOADED``) this thread claimed."""
        if state is ModelState.UNLOADED:
            self._do_load()
        else:
            self._do_wake()

    def _member_of(self, pool: object) -> Callable[[], None] | None:
        """A check that the model still belongs to ``pool`` (``None``: no pool, no check)."""
        if pool is None:
            return None

        def check() -> None:
            if self._owner is not pool:
                raise self._removed(pool)

        return check

    def _removed(self, pool: object) -> ModelStateError:
        return ModelStateError(
            f"{self._name} was removed from pool {getattr(pool, 'name', pool)!r}"
        )

    def _return(self, token: int) -> None:
        self._life.put_back(token)  # the last lease out tells the owner and the keep-alive

    def _after_call(self) -> None:
        tracker = self._cleanup_tracker()
        if tracker is not None:
            tracker.after_call()

    def _cleanup_tracker(self) -> CleanupTracker | None:
        if self._tracker is None and self._policy is not None:
            self._tracker = self._policy.tracker(self._device)
        return self._tracker
