"""What an operation leaves behind: its record, the log of recent ones, and the memory line.

Every front end (HTTP API, web panel, script, watch) reads the same
:class:`Operation` and writes to an :class:`OperationLog`; :func:`memory_line`
is how a device's memory reads to a person.
"""

from __future__ import annotations

import collections
import datetime
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from vramkit._units import format_bytes, format_part_of
from vramkit.devices import DeviceMemory
from vramkit.errors import InvalidArgumentError
from vramkit.memory import MemorySnapshot

# The package's logger: operations and watches log under vramkit.controls.
_log = logging.getLogger("vramkit.controls")

OUTCOMES = ("ok", "noop", "busy", "not_found", "unsupported", "no_room", "failed")
"""How an :class:`Operation` can end.

``ok``: done. ``noop``: nothing to do (already unloaded, not offloaded).
``busy``: the model has leases out or is mid-transition; nothing was done.
``not_found``: no model of that name. ``unsupported``: the action does
nothing on that device (see :meth:`Controls.capabilities`). ``no_room``: a
wake found no room in its pool's budget. ``failed``: an error; the message
says which, and the model is in the state that error leaves it in.
"""

# What the memory line calls each kind of device ("GPU 0 Memory: 5.2 / 16.0 GiB (32%)").
_LABELS = {"cuda": "GPU {index} Memory", "xpu": "XPU {index} Memory", "mps": "GPU Memory (MPS)"}
_LABELS["cpu"] = "RAM"


def memory_line(reading: DeviceMemory) -> str:
    """One device's memory in Fun-ASR WebUI's form, with IEC units.

    Args:
        reading: A device reading, such as ``vramkit.snapshot()["cuda:0"]``.

    Returns:
        ``"GPU 0 Memory: 5.2 / 16.0 GiB (32%)"`` (driver or OS numbers, all
        processes), ``"RAM: 10.2 / 23.5 GiB (43%)"`` for the host, or the total
        alone where used memory cannot be read here.

    Example:
        >>> import vramkit
        >>> memory_line(vramkit.snapshot("cpu")["cpu"]).startswith("RAM: ")
        True
    """
    kind, _, index = reading.device.partition(":")
    label = _LABELS.get(kind, f"{reading.device} memory").format(index=index or "0")
    used, total = reading.used_bytes, reading.total_bytes
    if used is None or not total:
        return f"{label}: {format_bytes(total)} total, used unknown"
    return f"{label}: {format_part_of(used, total)} ({used / total:.0%})"


@dataclass(frozen=True, slots=True)
class Operation:
    """One control operation, as the operation log records it.

    Attributes:
        action: ``"free"``, ``"clear_cache"``, ``"unload"``, ``"offload"`` or ``"wake"``.
        outcome: One of :data:`OUTCOMES`.
        message: What happened, for a person: what came back, in bytes, or why
            nothing was done.
        caller: Who asked: a token name, a client address, a UI user, a watch.
        model: The model acted on (``None`` for ``free`` and ``clear_cache``).
        wall_time: ``time.time()`` when the operation started.
        seconds: How long it took.
        memory_before: Every device in scope, read before.
        memory_after: The same devices, read after.
        detail: Anything else: the tier, the models evicted, who holds leases.
    """

    action: str
    outcome: str
    message: str
    caller: str | None
    model: str | None
    wall_time: float
    seconds: float
    memory_before: MemorySnapshot
    memory_after: MemorySnapshot
    detail: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """Whether the operation did what was asked (``ok``) or had nothing to do (``noop``)."""
        return self.outcome in ("ok", "noop")

    @property
    def freed_bytes(self) -> dict[str, dict[str, int | None]]:
        """Bytes that came back per device and layer (negative: memory grew).

        Layers: ``allocated``, ``reserved``, ``process`` (this process per the
        driver or RSS), ``used`` (the whole device, every process); ``None``
        where a layer cannot be read here.
        """
        change = self.memory_after.diff(self.memory_before)
        return {delta.device: delta.freed() for delta in change.deltas}

    def to_dict(self) -> dict[str, Any]:
        """The operation as JSON-ready data (what the HTTP API answers and logs)."""
        return {
            "time": _iso(self.wall_time),
            "wall_time": self.wall_time,
            "caller": self.caller,
            "action": self.action,
            "model": self.model,
            "outcome": self.outcome,
            "message": self.message,
            "seconds": self.seconds,
            "freed_bytes": self.freed_bytes,
            "memory_before": self.memory_before.to_dict(),
            "memory_after": self.memory_after.to_dict(),
            "detail": _json_ready(self.detail),
        }

    def __str__(self) -> str:
        target = f" {self.model}" if self.model else ""
        return (
            f"{_iso(self.wall_time)} {self.caller or '-'} {self.action}{target}: "
            f"{self.outcome}: {self.message}"
        )


def _iso(wall_time: float) -> str:
    return datetime.datetime.fromtimestamp(wall_time).isoformat(timespec="seconds")


def _json_ready(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


class OperationLog:
    """The recent operations, oldest first: bounded, thread-safe, observable.

    Each operation appended is also logged on the ``vramkit.controls`` logger
    (INFO; WARNING when it found no room or failed) and handed to every
    subscriber, in the thread that ran it.

    Args:
        maxlen: How many operations to keep; older ones drop off.
    """

    def __init__(self, maxlen: int = 1000) -> None:
        if isinstance(maxlen, bool) or not isinstance(maxlen, int) or maxlen < 1:
            raise InvalidArgumentError(f"maxlen must be a whole number, 1 or more; got {maxlen!r}")
        self._lock = threading.Lock()
        self._entries: collections.deque[Operation] = collections.deque(maxlen=maxlen)
        self._subscribers: tuple[Callable[[Operation], object], ...] = ()

    @property
    def maxlen(self) -> int:
        """How many operations the log keeps."""
        return self._entries.maxlen or 0

    def append(self, operation: Operation) -> None:
        """Record ``operation``, log it and tell the subscribers."""
        if not isinstance(operation, Operation):
            raise InvalidArgumentError(f"append() takes an Operation; got {operation!r}")
        with self._lock:
            self._entries.append(operation)
        level = logging.WARNING if operation.outcome in ("no_room", "failed") else logging.INFO
        _log.log(level, "%s", operation, extra={"vramkit_operation": operation})
        for callback in self._subscribers:
            try:
                callback(operation)
            except Exception:  # a subscriber's bug must not fail the operation
                _log.exception("operation log subscriber %r failed", callback)

    def subscribe(self, callback: Callable[[Operation], object]) -> Callable[[], None]:
        """Call ``callback(operation)`` after each append.

        Returns:
            A function that unsubscribes (safe to call twice).
        """
        if not callable(callback):
            raise InvalidArgumentError(f"callback must be callable; got {callback!r}")
        with self._lock:
            self._subscribers = (*self._subscribers, callback)

        def unsubscribe() -> None:
            with self._lock:
                self._subscribers = tuple(s for s in self._subscribers if s is not callback)

        return unsubscribe

    def __iter__(self) -> Iterator[Operation]:
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def to_list(self, limit: int | None = None) -> list[dict[str, Any]]:
        """The operations as JSON-ready dicts, oldest first (the last ``limit`` only, if given)."""
        entries = list(self)
        if limit is not None:
            if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
                raise InvalidArgumentError(f"limit must be a whole number >= 0; got {limit!r}")
            entries = entries[len(entries) - limit :] if limit else []
        return [op.to_dict() for op in entries]
