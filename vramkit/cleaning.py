"""One cleanup path for every backend, and the policy of when it is worth running.

>>> import vramkit
>>> report = vramkit.cleanup("cpu")
>>> report.seconds >= 0
True

:func:`cleanup` collects, synchronizes, empties caches and trims the heap.
Cleanup is a policy, not a reflex: each ``empty_cache`` throws away blocks the
caching allocator would have reused, so call it between batches or models, not
after every tensor. A :class:`CleanupPolicy` says when (every N calls, every so
many seconds, under pressure) and a :class:`CleanupTracker` applies it to one
device; both are also exported by :mod:`vramkit.policy`.
"""

from __future__ import annotations

import gc
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from vramkit._gc import collect, freeze
from vramkit._units import check_flag, check_seconds, format_bytes
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.devices.cpu import malloc_trim
from vramkit.errors import InvalidArgumentError
from vramkit.memory import (
    LAYERS,
    MemoryDelta,
    MemorySnapshot,
    layer_bytes,
    read_devices,
    snapshot,
    target_devices,
)

__all__ = [
    "CleanupPolicy",
    "CleanupReason",
    "CleanupReport",
    "CleanupTracker",
    "cleanup",
    "freeze_heap",
]

CleanupReason = Literal["calls", "seconds", "pressure"]
"""Which rule of a :class:`CleanupPolicy` fired."""


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What a cleanup did and what it gave back.

    Attributes:
        before: Snapshot taken before cleaning.
        after: Snapshot taken after.
        collected: Objects the garbage collector freed (unreachable cycles).
        trimmed: Whether ``malloc_trim(0)`` ran (glibc hosts only).
        steps: The steps taken, in order, such as ``("gc", "synchronize cuda:0", ...)``.
        seconds: Wall time of the whole cleanup.
    """

    before: MemorySnapshot
    after: MemorySnapshot
    collected: int
    trimmed: bool
    steps: tuple[str, ...]
    seconds: float

    @property
    def delta(self) -> MemoryDelta:
        """``after - before``: negative numbers are memory given back."""
        return self.after - self.before

    def freed_bytes(self, device: str, layer: str = "headline") -> int | None:
        """Bytes given back on ``device`` in one layer (positive means freed).

        Args:
            device: A device name present in both snapshots, such as ``"cpu"``.
            layer: ``"allocated"``, ``"reserved"``, ``"used"`` (device-wide, per
                the driver or OS), ``"process"`` (this process per the driver or
                RSS), or ``"headline"`` (the first of
                :data:`vramkit.memory.USAGE_LAYERS` known here).

        Returns:
            Bytes freed, or ``None`` where that layer cannot be read here.

        Raises:
            InvalidArgumentError: An unknown layer.
        """
        if layer != "headline" and layer not in LAYERS:
            raise InvalidArgumentError(
                f"layer must be 'headline' or one of {', '.join(LAYERS)}; got {layer!r}"
            )
        change = self.delta[device]
        value = change.headline_bytes if layer == "headline" else layer_bytes(change, layer)
        return None if value is None else -value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {
            "collected": self.collected,
            "trimmed": self.trimmed,
            "steps": list(self.steps),
            "seconds": self.seconds,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "delta": self.delta.to_dict(),
        }

    def __str__(self) -> str:
        lines = [f"cleanup in {self.seconds * 1000:.1f} ms, {self.collected} objects collected"]
        for name in self.delta:
            freed = {
                layer: self.freed_bytes(name, layer)
                for layer in ("allocated", "reserved", "process")
            }
            shown = [f"{k} {format_bytes(v)}" for k, v in freed.items() if v is not None]
            lines.append(f"  {name:<7} freed " + (" · ".join(shown) or "n/a"))
        return "\n".join(lines)


def cleanup(
    device: DeviceLike | Iterable[DeviceLike] | None = None,
    *,
    gc_collect: bool = True,
    trim: bool = True,
    generation: int = 2,
) -> CleanupReport:
    """Free what can be freed and say how much came back.

    In order: ``gc.collect(generation)`` (so tensors held only by reference cycles die),
    then per device ``synchronize`` (so deferred frees happen) and the backend's
    ``empty_cache`` (CUDA also ``ipc_collect``; MPS ``torch.mps.empty_cache``;
    host ``malloc_trim(0)``), and ``malloc_trim(0)`` once more for the host heap
    that accelerator work leaves behind. No step creates a CUDA context.

    Args:
        device: ``None`` for every available device, or one or several names.
        gc_collect: Run the garbage collector first.
        trim: Return free heap pages to the OS on glibc hosts.
        generation: The oldest generation collected: ``2`` (the default) is a
            full collection, whose cost grows with the whole heap (about 0.2 s
            with FunASR loaded); ``0`` or ``1`` collect only the objects made
            since the last collections, which costs microseconds and frees the
            cycles a batch just dropped, but not cycles that lived long enough
            to reach the oldest generation.

    Returns:
        A :class:`CleanupReport` with snapshots before and after.

    Raises:
        InvalidArgumentError: ``generation`` is not 0, 1 or 2.
    """
    check_flag(gc_collect, "gc_collect")
    check_flag(trim, "trim")
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation <= 2:
        raise InvalidArgumentError(
            f"generation must be 0, 1 or 2 (the oldest gc generation collected); got {generation!r}"
        )
    started = time.perf_counter()
    devices = target_devices(device)
    before = read_devices(devices)
    steps: list[str] = []
    collected = 0
    if gc_collect:
        collected = collect(generation)
        steps.append("gc" if generation == 2 else f"gc young ({generation})")
    for target in devices:
        step = target.clean()  # the host's cache is the heap: trimmed once below
        if step is not None:
            steps.append(f"{step} {target}")
    # Accelerator work leaves host heap behind too (staging buffers, pickles):
    # trim even when only an accelerator was asked for.
    trimmed = trim and malloc_trim()
    if trimmed:
        steps.append("malloc_trim")
    after = read_devices(devices)
    return CleanupReport(
        before=before,
        after=after,
        collected=collected,
        trimmed=trimmed,
        steps=tuple(steps),
        seconds=time.perf_counter() - started,
    )


def freeze_heap() -> int:
    """Collect once, then freeze every object alive now: the startup heap, after models load.

    ``gc.freeze()`` moves the objects into a generation the garbage collector
    never walks, so later collections and leak checks cost what was made
    since rather than the whole heap (a leak-checked session on a FunASR
    process: a fraction of a millisecond instead of a tenth of a second).
    The tensors frozen here are remembered weakly, so a leak check still
    counts them, and a leak's holders are still named when they were frozen.

    The trade-off: frozen objects are freed by reference counting only. A
    reference cycle among them (a model dropped later whose modules refer to
    each other) is never collected until ``gc.unfreeze()``, so freeze what
    lives for the whole process, not a model you unload. Calling it again
    freezes what was made since as well; ``gc.unfreeze()`` undoes it.

    Returns:
        How many objects are frozen now.
    """
    collect()  # garbage frozen would never be collected
    freeze()  # and remember the frozen tensors now, not at the first leak check
    return gc.get_freeze_count()


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
