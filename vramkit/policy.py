"""When to clean up: a policy, not a reflex.

Each ``empty_cache`` throws away blocks the caching allocator would have
reused, so cleaning after every tensor makes inference slower for nothing.
A :class:`CleanupPolicy` says when cleanup is worth it: every N calls (a call
being one batch), every so many seconds, or when the device is nearly full.
A :class:`CleanupTracker` applies it to one device, and :func:`managed`
applies it to a plain inference function:

>>> from vramkit.policy import CleanupPolicy, managed
>>> @managed("cpu", cleanup=CleanupPolicy(every_calls=100))
... def predict(x: int) -> int:
...     return x + 1
>>> predict(1)
2
>>> predict.tracker.calls
1
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, ParamSpec, Protocol, TypeVar, cast, overload

from vramkit._units import check_seconds
from vramkit._utils import wrap_calls
from vramkit.cleaning import CleanupReport, cleanup
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError
from vramkit.memory import MemorySnapshot, snapshot
from vramkit.oom import oom_retry
from vramkit.session import GpuSession

__all__ = ["CleanupPolicy", "CleanupReason", "CleanupTracker", "ManagedFunction", "managed"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

CleanupReason = Literal["calls", "seconds", "pressure"]
"""Which rule of a :class:`CleanupPolicy` fired."""

_log = logging.getLogger("vramkit")


@dataclass(frozen=True, slots=True)
class CleanupPolicy:
    """When to run :func:`vramkit.cleanup` after calls. Rules combine: any one firing cleans.

    A cleanup fired by ``every_calls`` or ``every_seconds`` collects the young
    garbage-collector generations only (what the last calls dropped, in
    microseconds); one fired by ``above_fraction`` runs a full collection,
    whose cost grows with the whole heap, to get everything back.

    Attributes:
        every_calls: Clean after this many calls since the last cleanup
            (``1``: after every call, one call being one batch).
        every_seconds: Clean on the first call this many seconds after the
            last cleanup (checked at calls; no background thread).
        above_fraction: Clean when the device's used fraction (driver or OS
            view: ``used_bytes / total_bytes``) is at or above this.
        check_every_seconds: Read the device at most this often for the two
            pressure rules, so a call costs microseconds, not a device query.
        on_pressure: Called with the snapshot when usage crosses
            ``pressure_fraction`` upwards; fires once, and again only after
            usage has fallen below it (edge-triggered). A pool can evict here.
        pressure_fraction: The threshold for ``on_pressure``.

    Example:
        >>> policy = CleanupPolicy(every_calls=8, above_fraction=0.85)
        >>> policy.every_calls
        8
    """

    every_calls: int | None = None
    every_seconds: float | None = None
    above_fraction: float | None = 0.9
    check_every_seconds: float = 1.0
    on_pressure: Callable[[MemorySnapshot], object] | None = None
    pressure_fraction: float = 0.9

    def __post_init__(self) -> None:
        if self.every_calls is not None and (
            isinstance(self.every_calls, bool)
            or not isinstance(self.every_calls, int)
            or self.every_calls < 1
        ):
            raise InvalidArgumentError(
                f"every_calls must be a whole number of calls, 1 or more, or None; "
                f"got {self.every_calls!r}"
            )
        if self.every_seconds is not None:
            check_seconds(self.every_seconds, "every_seconds", allow_zero=False)
        if self.above_fraction is not None:
            _check_fraction(self.above_fraction, "above_fraction")
        check_seconds(self.check_every_seconds, "check_every_seconds")
        if self.on_pressure is not None and not callable(self.on_pressure):
            raise InvalidArgumentError(
                f"on_pressure must be a callable taking a MemorySnapshot, or None; "
                f"got {self.on_pressure!r}"
            )
        _check_fraction(self.pressure_fraction, "pressure_fraction")

    @classmethod
    def per_call(cls) -> CleanupPolicy:
        """Clean after every call: for functions where one call is one batch."""
        return cls(every_calls=1, above_fraction=None)

    @classmethod
    def never(cls) -> CleanupPolicy:
        """Never clean: leave the caching allocator alone."""
        return cls(above_fraction=None)

    @classmethod
    def default(cls) -> CleanupPolicy:
        """Clean only under pressure: when the device is 90% used or more."""
        return cls()

    @property
    def reads_device(self) -> bool:
        """Whether the policy needs device readings (a pressure rule or callback is set)."""
        return self.above_fraction is not None or self.on_pressure is not None

    def tracker(
        self, device: DeviceLike | None = None, *, clock: Callable[[], float] = time.monotonic
    ) -> CleanupTracker:
        """A tracker applying this policy to ``device`` (``None``: the default device).

        Args:
            device: The device to watch and clean.
            clock: Seconds, monotonic; tests pass a controllable one.

        Returns:
            A new :class:`CleanupTracker` with its own counters.
        """
        return CleanupTracker(self, device, clock=clock)


def _check_fraction(value: object, what: str) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or not 0 < value <= 1
    ):
        raise InvalidArgumentError(
            f"{what} must be a fraction of the device, more than 0 and at most 1 "
            f"(0.9 = 90% used); got {value!r}"
        )


class CleanupTracker:
    """The counters of one :class:`CleanupPolicy` on one device, safe to share between threads.

    Call :meth:`after_call` after each call (each batch); it costs a lock and
    a few comparisons, plus a device reading at most every
    ``check_every_seconds`` when a pressure rule is set.
    """

    def __init__(
        self,
        policy: CleanupPolicy,
        device: DeviceLike | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Start counting now.

        Args:
            policy: The rules.
            device: The device to read and clean (``None``: the default device).
            clock: Seconds, monotonic; tests pass a controllable one.

        Raises:
            InvalidArgumentError: ``policy`` is not a :class:`CleanupPolicy`,
                ``clock`` is not callable, or ``device`` is malformed.
        """
        if not isinstance(policy, CleanupPolicy):
            raise InvalidArgumentError(f"policy must be a CleanupPolicy; got {policy!r}")
        if not callable(clock):
            raise InvalidArgumentError(f"clock must be a callable returning seconds; got {clock!r}")
        self._policy = policy
        self._device = resolve_device(device)
        self._clock = clock
        self._lock = threading.Lock()
        self._since_cleanup = 0
        self._last_cleanup = clock()
        self._last_check: float | None = None
        self._armed = True
        self._calls = 0
        self._cleanups = 0
        self._pressure_events = 0
        self._last_reason: CleanupReason | None = None
        self._last_fraction: float | None = None

    @property
    def policy(self) -> CleanupPolicy:
        """The rules applied."""
        return self._policy

    @property
    def device(self) -> Device:
        """The device read and cleaned."""
        return self._device

    @property
    def calls(self) -> int:
        """Calls counted since the tracker was made."""
        return self._calls

    @property
    def cleanups(self) -> int:
        """Cleanups run (decided) since the tracker was made."""
        return self._cleanups

    @property
    def pressure_events(self) -> int:
        """Times ``on_pressure`` fired."""
        return self._pressure_events

    @property
    def last_reason(self) -> CleanupReason | None:
        """Which rule fired the latest cleanup: ``"calls"``, ``"seconds"`` or ``"pressure"``."""
        return self._last_reason

    @property
    def last_fraction(self) -> float | None:
        """The device's used fraction at the latest reading, or ``None`` (none taken or unknown)."""
        return self._last_fraction

    def after_call(self) -> CleanupReport | None:
        """Count one call and clean up if a rule fires.

        Returns:
            The :class:`~vramkit.CleanupReport` when a cleanup ran, else ``None``.
        """
        policy = self._policy
        reading: MemorySnapshot | None = None
        fire = False
        with self._lock:
            self._calls += 1
            self._since_cleanup += 1
            now = self._clock()
            reason: CleanupReason | None = None
            if policy.every_calls is not None and self._since_cleanup >= policy.every_calls:
                reason = "calls"
            elif (
                policy.every_seconds is not None
                and now - self._last_cleanup >= policy.every_seconds
            ):
                reason = "seconds"
            if policy.reads_device and (
                self._last_check is None or now - self._last_check >= policy.check_every_seconds
            ):
                self._last_check = now
                reading = snapshot(self._device)
                fraction = reading[str(self._device)].used_fraction
                self._last_fraction = fraction
                if fraction is not None:
                    if fraction >= policy.pressure_fraction:
                        fire = self._armed and policy.on_pressure is not None
                        if fire:
                            self._armed = False
                            self._pressure_events += 1
                    else:
                        self._armed = True  # fell below: the next crossing fires again
                    if (
                        reason is None
                        and policy.above_fraction is not None
                        and fraction >= policy.above_fraction
                    ):
                        reason = "pressure"
            if reason is not None:
                # Decided under the lock, run outside it: one thread cleans,
                # the others keep counting without waiting for it.
                self._since_cleanup = 0
                self._last_cleanup = now
                self._cleanups += 1
                self._last_reason = reason
        try:
            if fire and policy.on_pressure is not None and reading is not None:
                policy.on_pressure(reading)
        finally:
            report = None
            if reason is not None:
                # A cadence cleans what the last calls dropped: the young
                # generations hold it, and a full collection would cost a walk
                # of the whole heap every batch. Pressure wants everything back.
                generation = 2 if reason == "pressure" else 1
                report = cleanup(self._device, generation=generation)
        return report

    def __repr__(self) -> str:
        return (
            f"<CleanupTracker {self._device}: {self._calls} calls, {self._cleanups} cleanups, "
            f"{self._pressure_events} pressure events>"
        )


class ManagedFunction(Protocol[P, R_co]):
    """A function wrapped by :func:`managed`: call it as before."""

    tracker: CleanupTracker
    """The cleanup counters shared by every call of this function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call the function, then let the tracker decide on cleanup."""
        ...


_PER_CALL: Final = CleanupPolicy.per_call()


@overload
def managed(device: Callable[P, R], /) -> ManagedFunction[P, R]: ...
@overload
def managed(
    device: DeviceLike | None = None,
    *,
    cleanup: CleanupPolicy | None = _PER_CALL,
    oom_retries: int = 0,
    session: GpuSession | None = None,
) -> Callable[[Callable[P, R]], ManagedFunction[P, R]]: ...
def managed(
    device: DeviceLike | Callable[..., Any] | None = None,
    *,
    cleanup: CleanupPolicy | None = _PER_CALL,
    oom_retries: int = 0,
    session: GpuSession | None = None,
) -> ManagedFunction[..., Any] | Callable[[Callable[P, R]], ManagedFunction[P, R]]:
    """Give a plain inference function a cleanup cadence, OOM recovery and a leak check.

    For functions that hold no :class:`ManagedModel` (a model kept elsewhere,
    or a FunASR ``AutoModel`` built once). Each call runs, in order: inside
    ``session`` when given; the function, retried after an out-of-memory error
    ``oom_retries`` times (see :func:`vramkit.oom_retry`); then the policy's
    tracker, which cleans up when a rule fires. Coroutine functions get an
    async wrapper. Use bare (``@managed``) or with arguments.

    Args:
        device: The device to clean and read (``None``: the default device).
        cleanup: When to clean up; ``CleanupPolicy.per_call()`` by default
            (every call is one batch); ``None`` means never.
        oom_retries: Retries after an out-of-memory error (0: none).
        session: A :class:`GpuSession` to run each call in, such as
            ``gpu_session(leak_check="warn")``.

    Returns:
        A decorator, or with bare ``@managed`` the wrapped function, whose
        ``tracker`` attribute holds the counters.

    Raises:
        InvalidArgumentError: A setting of the wrong type or value.
    """
    if callable(device) and not isinstance(device, str | int | Device):
        return managed(None, cleanup=cleanup, oom_retries=oom_retries, session=session)(device)
    policy = CleanupPolicy.never() if cleanup is None else cleanup
    if not isinstance(policy, CleanupPolicy):
        raise InvalidArgumentError(f"cleanup must be a CleanupPolicy or None; got {cleanup!r}")
    if isinstance(oom_retries, bool) or not isinstance(oom_retries, int) or oom_retries < 0:
        raise InvalidArgumentError(
            f"oom_retries must be a whole number of retries, 0 or more; got {oom_retries!r}"
        )
    if session is not None and not isinstance(session, GpuSession):
        raise InvalidArgumentError(
            f"session must be a GpuSession (from vramkit.gpu_session(...)) or None; got {session!r}"
        )
    target = resolve_device(device)

    def decorate(function: Callable[P, R]) -> ManagedFunction[P, R]:
        if not callable(function) or inspect.isclass(function):
            raise InvalidArgumentError(f"managed decorates a function; got {function!r}")
        tracker = policy.tracker(target)
        call: Callable[..., Any] = function
        if oom_retries:
            call = oom_retry(oom_retries, device=target)(function)
        wrapper: Any = wrap_calls(
            function,
            call,
            start=lambda: None,
            failed=lambda _, __: _after_failure(tracker),
            succeeded=lambda _: tracker.after_call(),
        )
        if session is not None:
            # Outermost, so the leak check sees memory after the policy's cleanup.
            wrapper = session(wrapper)
        wrapper.tracker = tracker
        return cast("ManagedFunction[P, R]", wrapper)

    return decorate


def _after_failure(tracker: CleanupTracker) -> None:
    """Count a failed call too (it used memory), without hiding its exception."""
    try:
        tracker.after_call()
    except Exception:
        _log.warning("cleanup after a failed call failed", exc_info=True)
