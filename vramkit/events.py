"""Every transition of a managed model, as an event to subscribers and a log record.

>>> import vramkit
>>> seen = []
>>> unsubscribe = vramkit.events.subscribe(seen.append)
>>> unsubscribe()

Subscribers run synchronously in the thread that made the transition, after
it completed; they must be quick. An exception in a subscriber is logged on
the ``vramkit`` logger and never disturbs the transition. The same events go
to the ``vramkit`` logger at INFO (DEBUG for leases and expiry checks), so an
application that only configures logging gets the operation log for free.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vramkit._layers import Reading, usage_change
from vramkit._units import format_bytes
from vramkit.errors import InvalidArgumentError

__all__ = ["Event", "emit", "subscribe"]

logger = logging.getLogger("vramkit")

_lock = threading.Lock()
_subscribers: tuple[Callable[[Event], object], ...] = ()


@dataclass(frozen=True, slots=True)
class Event:
    """One transition.

    Attributes:
        kind: What happened: ``"load"``, ``"unload"``, ``"offload"``, ``"wake"``,
            ``"evict"``, ``"expire"``, ``"oom"``, ``"load_failed"``, ...
        model: The model's name (or the pool's, for pool events).
        device: The device concerned, such as ``"cuda:0"``.
        state_before: The model's state before, such as ``"READY"``.
        state_after: Its state after.
        seconds: How long the transition took.
        memory_before: The device's reading before, when taken.
        memory_after: The device's reading after, when taken.
        bytes: The bytes the transition moved or freed, where known.
        detail: Anything else worth knowing (tier, reason, holders...).
        wall_time: ``time.time()`` when the event was emitted.
    """

    kind: str
    model: str
    device: str
    state_before: str
    state_after: str
    seconds: float = 0.0
    memory_before: Reading | None = None
    memory_after: Reading | None = None
    bytes: int | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    wall_time: float = field(default_factory=time.time)

    def describe(self) -> str:
        """One line for logs: ``load asr on cpu: UNLOADED -> READY in 0.05 s, 12.0 MiB``."""
        text = (
            f"{self.kind} {self.model} on {self.device}: {self.state_before} -> "
            f"{self.state_after} in {self.seconds:.3f} s"
        )
        if self.bytes is not None:
            text += f", {format_bytes(self.bytes)}"
        before, after = self.memory_before, self.memory_after
        moved = None if before is None or after is None else usage_change(before, after)
        if moved is not None:
            layer, change = moved
            text += f" ({layer} {format_bytes(change, signed=True)})"
        reason = self.detail.get("reason")
        if reason:
            text += f" [{reason}]"
        return text

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (memory readings as dicts, detail values as strings where needed)."""
        return {
            "kind": self.kind,
            "model": self.model,
            "device": self.device,
            "state_before": self.state_before,
            "state_after": self.state_after,
            "seconds": self.seconds,
            "bytes": self.bytes,
            "memory_before": None if self.memory_before is None else self.memory_before.to_dict(),
            "memory_after": None if self.memory_after is None else self.memory_after.to_dict(),
            "detail": {
                k: v if isinstance(v, int | float | str | bool | None) else str(v)
                for k, v in self.detail.items()
            },
            "wall_time": self.wall_time,
        }


def subscribe(callback: Callable[[Event], object]) -> Callable[[], None]:
    """Call ``callback(event)`` after every transition, in the transitioning thread.

    Args:
        callback: Receives each :class:`Event`.

    Returns:
        A function that unsubscribes ``callback`` (safe to call twice).
    """
    global _subscribers
    _check_callable(callback)
    with _lock:
        _subscribers = (*_subscribers, callback)

    def unsubscribe() -> None:
        global _subscribers
        with _lock:
            _subscribers = tuple(s for s in _subscribers if s is not callback)

    return unsubscribe


def _check_callable(callback: object) -> None:
    if not callable(callback):
        raise InvalidArgumentError(f"callback must be callable; got {callback!r}")


def emit(event: Event, *, level: int = logging.INFO) -> None:
    """Log ``event`` on the ``vramkit`` logger and hand it to every subscriber."""
    if logger.isEnabledFor(level):
        logger.log(level, "%s", event.describe(), extra={"vramkit_event": event})
    for callback in _subscribers:  # a tuple swapped atomically: no lock needed to read
        try:
            callback(event)
        except Exception:  # a subscriber's bug must not break a load or unload
            logger.exception("vramkit event subscriber %r failed on %s", callback, event.kind)
