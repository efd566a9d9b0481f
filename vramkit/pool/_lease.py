"""A lease taken through a pool, and ``ModelPool.call``'s retry: room is made on out of memory.

When a block borrowing a pooled model runs out of memory, the pool evicts its
other idle models and cleans up before the error leaves the block, so that a
retry has room; ``ModelPool.call`` retries once (:class:`RetryOnce`, an
:class:`~vramkit.oom.OomRetry`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Protocol, cast

from vramkit import events
from vramkit.cleaning import cleanup
from vramkit.devices import Device
from vramkit.model import ManagedModel
from vramkit.model._lease import Lease
from vramkit.oom import OomRetry, is_oom_error

__all__ = ["Evicting", "PoolLease", "RetryOnce"]


class Evicting(Protocol):
    """What a pool lease needs of its pool."""

    _leaving: set[str]  # members being removed
    _closed: bool
    _gated: bool  # either of the above: leases take the locked way

    def _entering_model(self, model: ManagedModel[Any]) -> AbstractContextManager[None]:
        """Mark a lease in progress on a member (``remove()`` waits); refuse a non-member."""
        ...

    def evict_idle(self, *, exclude: Iterable[str] = ()) -> list[str]:
        """Evict every idle model but those named."""
        ...


class RetryOnce(OomRetry):
    """:meth:`ModelPool.call`'s retry: the lease already made room when it failed; say so, retry."""

    __slots__ = ("device",)

    def __init__(self, name: str, device: Device) -> None:
        super().__init__(name, translate=False)
        self.device = device

    def again(self, exc: BaseException, attempt: int) -> bool:
        return attempt < 2

    def recover(self, exc: BaseException, attempt: int) -> None:
        events.emit(
            events.Event(
                "oom",
                self.name,
                str(self.device),
                "READY",
                "READY",
                detail={"reason": "out of memory in a lease: evicted others, retrying"},
            )
        )


class PoolLease(Lease[Any]):
    """A lease taken through the pool: OOM inside the block evicts the others first.

    One object, as ``mm.use()`` makes one: while no member is being removed
    and the pool is open, entering is the model's own lock-free lease, which
    is refused once the model has left the pool (and a load it needs is
    admitted by the pool, which refuses a model being removed). Otherwise
    (the pool is *gated*) the lease is marked as entering, so that
    ``remove()`` waits for it or refuses it.
    """

    __slots__ = ()
    _pool: Evicting  # made as Lease(model, pool): no constructor of its own to call

    def _enter_slow(self, held: int) -> tuple[Any, int]:
        model = cast("ManagedModel[Any]", self._model)
        pool = self._pool
        if not pool._gated:  # the model left the pool (or is not READY): refused or loaded
            return model._acquire_slow(pool, held)
        if held:
            model._life.put_back(held)
        with pool._entering_model(model):  # refuses a model being removed, or a closed pool
            return model._acquire_slow(pool)

    def _failed(self, exc: BaseException) -> None:
        if is_oom_error(exc):
            self._make_room()

    async def __aenter__(self) -> Any:
        with self._pool._entering_model(cast("ManagedModel[Any]", self._model)):
            return await Lease.__aenter__(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await Lease.__aexit__(self, exc_type, exc, tb)
        if exc is not None and is_oom_error(exc):
            await asyncio.to_thread(self._make_room)  # unloading can take seconds

    def _make_room(self) -> None:
        """After an out-of-memory error in the block: evict the other idle models, clean up."""
        self._pool.evict_idle(exclude=[self._model.name])
        cleanup(self._model.device)
