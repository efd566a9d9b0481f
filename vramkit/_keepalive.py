"""Keep-alive expiry: one background thread unloads models that stayed idle too long.

Ollama's semantics: ``keep_alive`` seconds after the last lease ends, an idle
model is unloaded; ``0`` unloads as soon as the last lease ends; ``None`` never.
A lease taken in between cancels the expiry (the model's idle stamp changed),
so an expiry that arrives while a request runs is simply dropped and
re-scheduled when that request ends.

The thread holds no lock while it unloads: it pops what is due, releases its
lock, then asks each model to expire itself. Each pool owns one scheduler;
models outside a pool share a process-wide one. Threads are daemons, stopped by
:meth:`KeepAliveScheduler.close` and at interpreter exit.

One thread serves every model of a pool (or of the process), so no single
entry may stop it: an infinite delay is "never" and is not queued, a delay
longer than a lock can wait is waited for in slices, a NaN or negative delay
is refused in the caller's thread, and anything that still goes wrong in the
thread is logged and survived.
"""

from __future__ import annotations

import atexit
import datetime
import heapq
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable
from typing import Protocol

from vramkit.errors import InvalidArgumentError

__all__ = ["Expirable", "KeepAliveScheduler", "default_scheduler", "keep_alive_seconds"]

_log = logging.getLogger("vramkit")

_LONGEST_WAIT = threading.TIMEOUT_MAX / 2  # past this a lock's wait overflows: wait in slices
_RETRY_AFTER_ERROR = 1.0  # seconds the thread rests after an unexpected error


def keep_alive_seconds(value: object) -> float | None:
    """Check a ``keep_alive`` setting: seconds >= 0 or a timedelta; ``None`` or infinity = never.

    Returns:
        The seconds, or ``None`` for "never expire".

    Raises:
        InvalidArgumentError: NaN, a negative number, a bool or anything else.
    """
    if value is None:
        return None
    if isinstance(value, datetime.timedelta):
        value = value.total_seconds()
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise InvalidArgumentError(
            f"keep_alive must be seconds >= 0 (0 unloads when idle), a timedelta, or None "
            f"(never expire); got {value!r}"
        )
    if value < 0:
        raise InvalidArgumentError(
            f"keep_alive must be >= 0 seconds, or None to never expire; got {value!r}"
        )
    return None if math.isinf(value) else float(value)


class Expirable(Protocol):
    """What the scheduler needs from a model."""

    def _expire(self, stamp: int) -> None:
        """Unload if still idle since ``stamp``."""
        ...


class KeepAliveScheduler:
    """A heap of deadlines served by one daemon thread.

    Args:
        name: Thread name, for debuggers and ``threading.enumerate()``.
        clock: Monotonic seconds; tests pass a controllable clock and drive
            expiry with :meth:`run_due` (``start=False``).
        start: Start the background thread on first use. With ``False`` nothing
            runs by itself: call :meth:`run_due`.
    """

    def __init__(
        self,
        name: str = "vramkit-keepalive",
        *,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> None:
        self._name = name
        self._clock = clock
        self._autostart = start
        self._cond = threading.Condition(threading.Lock())
        self._heap: list[tuple[float, int, weakref.ref[Expirable], int]] = []
        self._seq = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def clock(self) -> Callable[[], float]:
        """The clock deadlines are measured on."""
        return self._clock

    def schedule(self, model: Expirable, delay: float | None, stamp: int) -> None:
        """Ask ``model`` to expire ``delay`` seconds from now unless used since ``stamp``.

        ``None`` or infinity schedules nothing (never).

        Raises:
            InvalidArgumentError: ``delay`` is NaN, negative or not a number.
        """
        delay = keep_alive_seconds(delay)
        if delay is None:
            return
        with self._cond:
            if self._closed:
                return
            self._seq += 1
            heapq.heappush(
                self._heap, (self._clock() + delay, self._seq, weakref.ref(model), stamp)
            )
            if self._autostart and self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            self._cond.notify()

    def pending(self) -> int:
        """How many expiries are waiting (including stale ones not yet dropped)."""
        with self._cond:
            return len(self._heap)

    def run_due(self) -> int:
        """Expire everything due now, in this thread. Returns how many models were asked."""
        due = self._pop_due()
        for model, stamp in due:
            self._fire(model, stamp)
        return len(due)

    def _pop_due(self) -> list[tuple[Expirable, int]]:
        now = self._clock()
        due = []
        with self._cond:
            while self._heap and self._heap[0][0] <= now:
                _, _, ref, stamp = heapq.heappop(self._heap)
                model = ref()
                if model is not None:
                    due.append((model, stamp))
        return due

    def _fire(self, model: Expirable, stamp: int) -> None:
        try:
            model._expire(stamp)
        except Exception:  # one model's failure must not stop the others' expiry
            _log.exception("keep-alive expiry of %r failed", model)

    def _run(self) -> None:
        while True:
            try:
                if not self._wait_until_due():
                    return
                self.run_due()  # outside the lock: unloading may take seconds and re-schedule
            except Exception:  # the thread serves every model: it must outlive any one error
                _log.exception("keep-alive thread %s: unexpected error; it carries on", self._name)
                with self._cond:
                    if self._closed:
                        return
                    self._cond.wait(_RETRY_AFTER_ERROR)

    def _wait_until_due(self) -> bool:
        """Block until the first deadline passes. Returns ``False`` once closed."""
        with self._cond:
            while not self._closed:
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - self._clock()
                if wait <= 0:
                    return True
                self._cond.wait(min(wait, _LONGEST_WAIT))
            return False

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread (pending expiries are dropped) and wait for it to end."""
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    @property
    def thread(self) -> threading.Thread | None:
        """The background thread, once started."""
        return self._thread


_default: KeepAliveScheduler | None = None
_default_lock = threading.Lock()


def default_scheduler() -> KeepAliveScheduler:
    """The process-wide scheduler for models outside any pool (started lazily)."""
    global _default
    with _default_lock:
        if _default is None or _default.closed:
            _default = KeepAliveScheduler()
            atexit.register(_default.close)
        return _default
