"""A running watch: threshold alerts on devices and a timed action, on a keep-alive timer.

:class:`Watch` runs its action through the controls it was given (so the
action lands in their operation log); every running watch is listed by
:func:`live_watches`, and all stop when the process exits.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from vramkit import events
from vramkit._keepalive import KeepAliveScheduler
from vramkit.controls._operations import Operation, _log, memory_line
from vramkit.devices import Device, DeviceLike, DeviceMemory
from vramkit.memory import read_devices


class _Controls(Protocol):
    """What a watch needs of its controls (:class:`~vramkit.controls.Controls`)."""

    def capabilities(self, device: DeviceLike) -> dict[str, str | None]: ...

    def free(self, *, caller: str | None = None) -> Operation: ...

    def clear_cache(
        self, *, caller: str | None = None, device: DeviceLike | None = None
    ) -> Operation: ...


_CHECK, _ACTION = 0, 1
_watches: dict[int, Watch] = {}
_watches_lock = threading.Lock()


def live_watches() -> list[Watch]:
    """Every running :class:`Watch` of the process, oldest first."""
    with _watches_lock:
        return list(_watches.values())


class Watch:
    """A running :func:`watch`: threshold alerts and a timed cleanup. Stop it with :meth:`stop`.

    Built by :func:`watch`; see there for the arguments.
    """

    def __init__(
        self,
        controls: _Controls,
        *,
        threshold: float | None,
        every: float | None,
        action: str | Callable[[], object] | None,
        devices: tuple[Device, ...],
        check_every: float,
        name: str,
        clock: Callable[[], float],
        start: bool,
    ) -> None:
        self._controls = controls
        self._threshold = threshold
        self._every = every
        self._action = action
        self._devices = devices
        self._check_every = check_every
        self._name = name
        self._lock = threading.Lock()
        self._alerting: dict[str, bool] = dict.fromkeys((str(d) for d in devices), False)
        self._readings: dict[str, DeviceMemory] = {}
        self._alerts = 0
        self._actions = 0
        self._last_check: float | None = None
        self._last_action: float | None = None
        self._last_outcome: str | None = None
        self._next_action: float | None = None
        self._action_disabled = self._why_action_does_nothing()
        self._scheduler = KeepAliveScheduler(f"vramkit-watch-{name}", clock=clock, start=start)
        self._stopped = False
        with _watches_lock:
            _watches[id(self)] = self
        if threshold is not None:
            self._scheduler.schedule(self, 0.0, _CHECK)
        if every is not None and self._action_disabled is None:
            self._next_action = clock() + every
            self._scheduler.schedule(self, every, _ACTION)

    def _why_action_does_nothing(self) -> str | None:
        if self._action != "clear_cache":
            return None
        reasons = [self._controls.capabilities(d)["clear_cache"] for d in self._devices]
        return None if any(r is None for r in reasons) else reasons[0]

    @property
    def name(self) -> str:
        """The watch's name (in events, logs and the operation log's caller)."""
        return self._name

    @property
    def running(self) -> bool:
        """Whether the watch is running (not stopped)."""
        return not self._stopped

    @property
    def alerting(self) -> dict[str, bool]:
        """Per device: whether it is above the threshold now (as of the last check)."""
        with self._lock:
            return dict(self._alerting)

    def check(self) -> list[str]:
        """Read the devices now and raise or clear alerts.

        Returns:
            The devices that crossed the threshold upwards in this check.
        """
        if self._threshold is None:
            return []
        snap = read_devices(self._devices)
        crossed = []
        for reading in snap.readings:
            fraction = reading.used_fraction
            with self._lock:
                self._readings[reading.device] = reading
                was = self._alerting[reading.device]
                now = fraction is not None and fraction >= self._threshold
                self._alerting[reading.device] = now
                if now and not was:
                    self._alerts += 1
            if now != was:
                self._announce(reading, fraction, now)
            if now and not was:
                crossed.append(reading.device)
        with self._lock:
            self._last_check = snap.wall_time
        return crossed

    def _announce(self, reading: DeviceMemory, fraction: float | None, above: bool) -> None:
        where = "over" if above else "back under"
        reason = f"{memory_line(reading)}: {where} the {self._threshold:.0%} threshold"
        event = events.Event(
            "threshold",
            self._name,
            reading.device,
            "below" if above else "above",
            "above" if above else "below",
            memory_after=reading,
            detail={"reason": reason, "threshold": self._threshold, "used_fraction": fraction},
        )
        events.emit(event, level=logging.WARNING if above else logging.INFO)

    def run_action(self) -> Operation | None:
        """Run the timed action now.

        Returns:
            The :class:`Operation` for ``"free"`` and ``"clear_cache"``; for a
            callable, what it returned if that is an ``Operation``, else ``None``.
        """
        action = self._action
        result: object = None
        outcome = "ok"
        try:
            if action == "free":
                result = self._controls.free(caller=self._name)
            elif action == "clear_cache":
                result = self._controls.clear_cache(caller=self._name)
            elif callable(action):
                result = action()
        except Exception:  # the timer must keep running after a failed action
            _log.exception("watch %s: the timed action failed", self._name)
            outcome = "failed"
        if isinstance(result, Operation):
            outcome = result.outcome
        with self._lock:
            self._actions += 1
            self._last_action = time.time()
            self._last_outcome = outcome
        return result if isinstance(result, Operation) else None

    def _expire(self, stamp: int) -> None:
        """A timer fired (the scheduler's protocol): check or act, then re-arm."""
        if self._stopped:
            return
        delay = self._check_every if stamp == _CHECK else self._every
        try:
            if stamp == _CHECK:
                self.check()
            else:
                self.run_action()
        finally:
            if not self._stopped and delay is not None:
                if stamp == _ACTION:
                    self._next_action = self._scheduler.clock() + delay
                self._scheduler.schedule(self, delay, stamp)

    def run_due(self) -> int:
        """Run the checks and actions that are due now, in this thread (for ``start=False``)."""
        return self._scheduler.run_due()

    def stop(self) -> None:
        """Stop checking and acting (idempotent); the watch leaves ``status()``."""
        self._stopped = True
        with _watches_lock:
            _watches.pop(id(self), None)
        self._scheduler.close()

    def state(self) -> dict[str, Any]:
        """The watch as JSON-ready data (what ``/status`` and ``/metrics`` show)."""
        action = self._action
        with self._lock:
            devices = {
                name: {
                    "alerting": alerting,
                    "used_fraction": (
                        self._readings[name].used_fraction if name in self._readings else None
                    ),
                    "memory_line": (
                        memory_line(self._readings[name]) if name in self._readings else None
                    ),
                }
                for name, alerting in self._alerting.items()
            }
            next_action = self._next_action
            return {
                "name": self._name,
                "running": not self._stopped,
                "threshold": self._threshold,
                "check_every_seconds": self._check_every,
                "every_seconds": self._every,
                "action": action if action is None or isinstance(action, str) else _named(action),
                "action_disabled": self._action_disabled,
                "devices": devices,
                "alerts": self._alerts,
                "actions_run": self._actions,
                "last_check": self._last_check,
                "last_action": self._last_action,
                "last_outcome": self._last_outcome,
                "next_action_in_seconds": (
                    None
                    if next_action is None or self._stopped
                    else max(next_action - self._scheduler.clock(), 0.0)
                ),
            }

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        return (
            f"<Watch {self._name!r} threshold={self._threshold} every={self._every} "
            f"action={self._action!r}{'' if self.running else ' stopped'}>"
        )


def _named(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or type(fn).__name__)


@atexit.register
def _stop_watches_at_exit() -> None:
    for running in live_watches():
        running.stop()
