"""Loading a pooled model in the background, when the budget has room for it now.

A pool prefetches one model at a time on its own thread (named
``vramkit-prefetch-<pool>``), started at the first prefetch. A prefetch never
waits for room: when the budget cannot take the model now, idle models
included, it loads nothing, says so in a ``prefetch_skipped`` event, and its
future answers ``False``. A prefetch still queued when its model is removed
from the pool skips it the same way.
"""

from __future__ import annotations

import concurrent.futures
import threading
import weakref
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from vramkit import events
from vramkit.errors import BudgetExceededError, ModelStateError
from vramkit.model import ManagedModel, ModelState

__all__ = ["Prefetcher"]


class Prefetcher:
    """A pool's prefetch thread.

    Args:
        pool: The pool's name, for the thread's name.
        room: Whether the budget has room for a model now, without waiting.
        entering: Marks a model as being entered, so that the pool's
            ``remove()`` waits for the prefetch; raises ``ModelStateError``
            when the model left the pool. Both are methods of the pool, held
            weakly.
    """

    def __init__(
        self,
        pool: str,
        room: Callable[[ManagedModel[Any]], bool],
        entering: Callable[[ManagedModel[Any]], AbstractContextManager[None]],
    ) -> None:
        self._prefix = f"vramkit-prefetch-{pool}"
        # Weakly: the pool owns its prefetcher, and a strong reference back would
        # keep a dropped pool and its models alive until the garbage collector ran.
        self._room = weakref.WeakMethod(room)
        self._entering = weakref.WeakMethod(entering)
        self._lock = threading.Lock()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None

    def submit(self, model: ManagedModel[Any]) -> concurrent.futures.Future[bool]:
        """Load or wake ``model`` on the prefetch thread (see :meth:`ModelPool.prefetch`)."""
        with self._lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=self._prefix
                )
            return self._executor.submit(self._prefetch, model)

    def _prefetch(self, model: ManagedModel[Any]) -> bool:
        entering = self._entering()
        if entering is None:  # the pool is gone
            return False
        try:
            with entering(model):
                return self._prefetch_member(model)
        except ModelStateError as exc:  # removed (or the pool closed) since it was queued
            _skipped(model, str(exc))
            return False

    def _prefetch_member(self, model: ManagedModel[Any]) -> bool:
        if model.state is ModelState.READY:
            return True
        room = self._room()
        if room is None or not room(model):
            _skipped(model, "no room in the budget right now")
            return False
        try:
            model.load()
        except BudgetExceededError:
            return False
        events.emit(events.Event("prefetch", model.name, str(model.device), "UNLOADED", "READY"))
        return True

    def shutdown(self) -> None:
        """Stop the thread, cancelling prefetches not started yet."""
        with self._lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    @property
    def threads(self) -> list[threading.Thread]:
        """The prefetch thread, while it lives."""
        return [t for t in threading.enumerate() if t.name.startswith(self._prefix)]


def _skipped(model: ManagedModel[Any], reason: str) -> None:
    state = model.state.value
    events.emit(
        events.Event(
            "prefetch_skipped",
            model.name,
            str(model.device),
            state,
            state,
            detail={"reason": reason},
        )
    )
