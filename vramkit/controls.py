"""Memory controls for services and UIs: status, free, clear cache, unload, offload, wake.

An HTTP admin API, a web panel and a maintenance script must do the same
operations with the same results, and write them to the same log. This module
is that one layer, in plain Python: :class:`Controls` works over given pools
and models (or every one alive in the process), each operation runs
synchronously and returns an :class:`Operation` saying what came back, in
bytes, and :class:`OperationLog` keeps the recent ones. A busy model is an
outcome, never an exception and never a wait.

>>> import torch, vramkit
>>> from vramkit.controls import Controls
>>> pool = vramkit.ModelPool("cpu", budget="64MiB", headroom=0, name="doc")
>>> _ = pool.register("small", lambda: torch.nn.Linear(64, 64))
>>> controls = Controls(pool)
>>> with pool.use("small"):
...     controls.unload("small", caller="doc").outcome
'busy'
>>> controls.unload("small", caller="doc").outcome
'ok'
>>> pool.close()

:func:`watch` adds the two automations Fun-ASR WebUI's documentation asks
for: an alert when a device crosses a fraction of its memory, and a cleanup
on a timer.
"""

from __future__ import annotations

import atexit
import collections
import datetime
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from vramkit import _runtime, events
from vramkit._keepalive import KeepAliveScheduler
from vramkit._units import format_bytes, format_part_of, parse_seconds
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceLike, DeviceMemory, available_devices, resolve_device
from vramkit.errors import BudgetExceededError, InvalidArgumentError, ModelBusyError, OffloadError
from vramkit.memory import DeviceMemoryDelta, MemorySnapshot, read_devices, target_devices
from vramkit.model import ManagedModel, ModelState, live_models
from vramkit.pool import ModelPool, live_pools

__all__ = [
    "ACTIONS",
    "OUTCOMES",
    "Controls",
    "Operation",
    "OperationLog",
    "Watch",
    "advertise_admin_url",
    "live_watches",
    "memory_line",
    "watch",
]

_log = logging.getLogger("vramkit.controls")

ACTIONS = ("free", "clear_cache", "unload", "offload_cpu", "offload_disk", "wake")
"""What :meth:`Controls.capabilities` answers for (offload is one action per tier)."""

OUTCOMES = ("ok", "noop", "busy", "not_found", "unsupported", "no_room", "failed")
"""How an :class:`Operation` can end.

``ok``: done. ``noop``: nothing to do (already unloaded, not offloaded).
``busy``: the model has leases out or is mid-transition; nothing was done.
``not_found``: no model of that name. ``unsupported``: the action does
nothing on that device (see :meth:`Controls.capabilities`). ``no_room``: a
wake found no room in its pool's budget. ``failed``: an error; the message
says which, and the model is in the state that error leaves it in.
"""

# Why an action does nothing on a kind of device, for UIs to disable the button.
_DOES_NOTHING: dict[str, dict[str, str]] = {
    "cpu": {
        "clear_cache": (
            "cpu has no allocator cache to clear: torch keeps no cached host memory "
            "(Free idle models collects garbage and trims the heap)"
        ),
        "offload_cpu": (
            "a model on cpu already lives in host RAM: the cpu tier frees nothing here "
            "(offload to disk, or unload)"
        ),
    },
}

# What the memory line calls each kind of device ("GPU 0 Memory: 5.2 / 16.0 GiB (32%)").
_LABELS = {"cuda": "GPU {index} Memory", "xpu": "XPU {index} Memory", "mps": "GPU Memory (MPS)"}
_LABELS["cpu"] = "RAM"

_SETTLED = (ModelState.UNLOADED, ModelState.READY, ModelState.OFFLOADED)


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


def advertise_admin_url(url: str | None) -> None:
    """Publish where this process's admin API answers, for ``vramkit ps`` and ``vramkit free``.

    Every process that uses vramkit publishes its models to a per-user
    runtime directory; this adds the URL of its admin API (``None``
    withdraws it). :mod:`vramkit.integrations.http` calls it for you.

    Args:
        url: Such as ``"http://127.0.0.1:8000/admin"``, or ``None``.

    Raises:
        InvalidArgumentError: ``url`` is not an ``http://`` or ``https://`` URL.
    """
    if url is not None and (
        not isinstance(url, str) or not url.startswith(("http://", "https://"))
    ):
        raise InvalidArgumentError(f"url must be an http:// or https:// URL, or None; got {url!r}")
    _runtime.advertise_admin(url)


# ---------------------------------------------------------------------- operations


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


# ---------------------------------------------------------------------- controls


class Controls:
    """Status and memory operations over some pools and models, with one operation log.

    Args:
        *targets: :class:`~vramkit.ModelPool` and :class:`~vramkit.ManagedModel`
            objects to act on. None given: every open pool and every live
            model of the process, looked up at each call.
        log: The :class:`OperationLog` to write to (default: a new one), so
            several front ends can share one.

    Raises:
        InvalidArgumentError: A target that is neither a pool nor a model.
    """

    def __init__(self, *targets: ModelPool | ManagedModel[Any], log: OperationLog | None = None):
        for position, target in enumerate(targets):
            if not isinstance(target, ModelPool | ManagedModel):
                raise InvalidArgumentError(
                    f"Controls takes ModelPool and ManagedModel objects; argument {position} is "
                    f"{target!r}"
                )
        if log is not None and not isinstance(log, OperationLog):
            raise InvalidArgumentError(f"log must be an OperationLog or None; got {log!r}")
        self._targets = targets
        self._log = log if log is not None else OperationLog()

    @property
    def log(self) -> OperationLog:
        """The operation log every operation is written to."""
        return self._log

    # ------------------------------------------------------------------ scope

    def pools(self) -> list[ModelPool]:
        """The open pools in scope."""
        if not self._targets:
            return live_pools()
        return [t for t in self._targets if isinstance(t, ModelPool) and not t.closed]

    def models(self) -> list[ManagedModel[Any]]:
        """Every model in scope: the pools' members in order, then the models outside them."""
        pools = self.pools()
        pooled = [model for pool in pools for model in pool]
        seen = {id(m) for m in pooled}
        if self._targets:
            loose = [t for t in self._targets if isinstance(t, ManagedModel)]
        else:
            loose = live_models()
        return pooled + [m for m in loose if id(m) not in seen and not m.closed]

    def devices(self) -> tuple[Device, ...]:
        """The devices in scope: ``cpu`` and the pools' and models' (every one, with no targets)."""
        if not self._targets:
            return available_devices()
        found = {Device("cpu")} | {p.device for p in self.pools()}
        found |= {m.device for m in self.models()}
        return tuple(sorted(found, key=lambda d: (not d.is_host, d.kind, d.index or 0)))

    # ------------------------------------------------------------------ reading

    def status(self) -> dict[str, Any]:
        """Devices, pools, models and watches, as JSON-ready data.

        Returns:
            ``devices``: each device's reading in three layers
            (``DeviceMemory.to_dict()``) plus ``used_fraction``,
            ``memory_line`` and ``capabilities``; ``pools``: each pool's
            accounting (``PoolStatus`` without its model lines); ``models``:
            one line per model (``ManagedModel.to_dict()`` with the pool's
            numbers for pooled models, and ``pinned``); ``watches``: each
            running :func:`watch`'s state; ``pid`` and ``wall_time``.
        """
        snap = read_devices(self.devices())
        pools, models = [], []
        for pool in self.pools():
            pool_status = pool.status()
            line = pool_status.to_dict()
            pools.append(line)
            for pooled in line.pop("models"):
                try:
                    extra = pool[pooled["name"]].to_dict()
                except KeyError:  # removed since: the pool's line is what there is
                    extra = {"device": pool_status.device}
                models.append({**extra, **pooled, "pool": pool.name})
        pooled_ids = {id(m) for pool in self.pools() for m in pool}
        for model in self.models():
            if id(model) not in pooled_ids:
                models.append({**model.to_dict(), "pinned": False})
        return {
            "pid": os.getpid(),
            "wall_time": snap.wall_time,
            "devices": [self._device_line(reading) for reading in snap.readings],
            "pools": pools,
            "models": models,
            "watches": [w.state() for w in live_watches()],
        }

    def _device_line(self, reading: DeviceMemory) -> dict[str, Any]:
        return {
            **reading.to_dict(),
            "used_fraction": reading.used_fraction,
            "memory_line": memory_line(reading),
            "capabilities": self.capabilities(reading.device),
        }

    def memory_lines(self) -> list[str]:
        """:func:`memory_line` of every device in scope, ``cpu`` first."""
        return [memory_line(r) for r in read_devices(self.devices()).readings]

    def capabilities(self, device: DeviceLike) -> dict[str, str | None]:
        """Why each action does nothing on ``device`` (``None``: it works), for UIs.

        Args:
            device: A device name such as ``"cuda:0"`` or ``"cpu"``.

        Returns:
            One entry per action in :data:`ACTIONS`: ``None`` where the action
            works, else the reason it does nothing there (a button shows it
            disabled, with that reason).

        Raises:
            InvalidArgumentError: A malformed or unknown device.
        """
        kind = resolve_device(device).kind
        limits = _DOES_NOTHING.get(kind, {})
        return {action: limits.get(action) for action in ACTIONS}

    # ------------------------------------------------------------------ operations

    def free(self, *, caller: str | None = None) -> Operation:
        """Evict every idle model, then clean up every device in scope.

        Pools evict their idle models the way they make room (a cheaper tier
        or unload, per their ``evict_to``); models outside pools are
        unloaded. Leased and loading models are left alone and named in the
        result. Then :func:`vramkit.cleanup` runs (gc, synchronize,
        ``empty_cache``, heap trim).

        Args:
            caller: Who asks, for the log.

        Returns:
            The :class:`Operation`, with the bytes that came back per device and layer.
        """
        return self._run("free", None, caller, self._free, self.devices())

    def _free(self) -> tuple[str, str, dict[str, Any]]:
        evicted: list[str] = []
        for pool in self.pools():
            evicted += pool.evict_idle()
        for model in self.models():
            if model.pool is None and _idle(model) and model.device_bytes:
                try:
                    model.unload()
                except ModelBusyError:
                    continue  # a lease arrived in between: it is not idle any more
                evicted.append(model.name)
        cleanup(self.devices())
        busy = {m.name: m.leases for m in self.models() if m.leases}
        text = (
            f"freed {len(evicted)} idle model{'s' if len(evicted) != 1 else ''} "
            f"({', '.join(evicted)}) and cleaned up"
            if evicted
            else "no idle model to evict; cleaned up"
        )
        if busy:
            text += "; left in use: " + ", ".join(f"{n} ({k} leases)" for n, k in busy.items())
        return "ok", text, {"evicted": evicted, "busy": busy}

    def clear_cache(
        self, *, caller: str | None = None, device: DeviceLike | None = None
    ) -> Operation:
        """Give allocator caches back to the driver (gc, synchronize, ``empty_cache``).

        Models are not touched. Devices where this does nothing (see
        :meth:`capabilities`) are skipped; if that leaves none, the outcome is
        ``unsupported`` with the reason.

        Args:
            caller: Who asks, for the log.
            device: One device to clear (default: every device in scope).

        Returns:
            The :class:`Operation`.
        """
        scope = self.devices() if device is None else (resolve_device(device),)
        able = tuple(d for d in scope if self.capabilities(d)["clear_cache"] is None)

        def run() -> tuple[str, str, dict[str, Any]]:
            if not able:
                reason = self.capabilities(scope[0])["clear_cache"]
                return "unsupported", str(reason), {}
            cleanup(able)
            return "ok", "cache cleared", {"devices": [str(d) for d in able]}

        return self._run("clear_cache", None, caller, run, able or scope, layers=_CACHE_LAYERS)

    def unload(self, name: str, *, caller: str | None = None) -> Operation:
        """Unload a model now, without waiting: a leased model answers ``busy``.

        Args:
            name: The model's name (``"pool/name"`` where two pools share a name).
            caller: Who asks, for the log.

        Returns:
            The :class:`Operation`; ``detail`` says whether the model died and
            who still held it.
        """

        def run(model: ManagedModel[Any]) -> tuple[str, str, dict[str, Any]]:
            report = model.unload()
            if report.state_before is ModelState.UNLOADED:
                return "noop", f"{model.name} was not loaded: nothing to unload", {}
            text = f"unloaded {model.name}"
            if not report.died:
                text += (
                    f"; still referenced by {report.holders[0] if report.holders else 'unknown'}"
                    f" (memory freed anyway: {format_bytes(report.neutralised_bytes)})"
                )
            detail = {"died": report.died, "holders": [str(h) for h in report.holders]}
            if "worker" in report.freed_bytes:
                # An isolated model: its memory was another process's, which this
                # process's readings never held, so the report's figure is the one.
                worker = report.freed_bytes["worker"]
                text += f"; its worker process ended ({format_bytes(worker)} back)"
                detail["worker_freed_bytes"] = worker
            return "ok", text, detail

        return self._model_op("unload", name, caller, run)

    def offload(self, name: str, tier: str = "cpu", *, caller: str | None = None) -> Operation:
        """Move a model's weights off its device now (``cpu`` or ``disk`` tier), without waiting.

        Args:
            name: The model's name.
            tier: ``"cpu"`` (host RAM) or ``"disk"``.
            caller: Who asks, for the log.

        Returns:
            The :class:`Operation`.

        Raises:
            InvalidArgumentError: ``tier`` is not ``"cpu"`` or ``"disk"``.
        """
        if tier not in ("cpu", "disk"):
            raise InvalidArgumentError(f"tier must be 'cpu' or 'disk'; got {tier!r}")

        def run(model: ManagedModel[Any]) -> tuple[str, str, dict[str, Any]]:
            reason = self.capabilities(model.device)[f"offload_{tier}"]
            if reason is not None:
                return "unsupported", reason, {"tier": tier}
            if model.state is ModelState.UNLOADED:
                return "noop", f"{model.name} is not loaded: nothing to offload", {"tier": tier}
            try:
                report = model.offload(tier)
            except OffloadError as exc:
                return "failed", f"{exc}; {model.name} is still {model.state.value}", {}
            if report.note.startswith("already"):
                return "noop", f"{model.name} is {report.note}", {"tier": tier}
            text = f"offloaded {model.name} ({format_bytes(report.weight_bytes)}) to {tier}"
            return "ok", text, {"tier": tier, "method": report.method}

        return self._model_op("offload", name, caller, run)

    def wake(self, name: str, *, caller: str | None = None) -> Operation:
        """Bring a model back to ``READY`` now: wake it if offloaded, load it if unloaded.

        Args:
            name: The model's name.
            caller: Who asks, for the log.

        Returns:
            The :class:`Operation`; ``no_room`` when its pool's budget has none.
        """

        def run(model: ManagedModel[Any]) -> tuple[str, str, dict[str, Any]]:
            state = model.state
            if state is ModelState.READY:
                return "noop", f"{model.name} is already ready", {}
            if state is ModelState.OFFLOADED:
                woke = model.wake()
                tier = woke.tier if woke is not None else None
                return "ok", f"woke {model.name} from {tier}", {"tier": tier}
            model.load()
            return "ok", f"loaded {model.name} ({format_bytes(model.size_bytes)})", {}

        return self._model_op("wake", name, caller, run)

    def watch(self, **options: Any) -> Watch:
        """Start a :func:`watch` whose timed action runs through these controls (same log)."""
        return watch(controls=self, **options)

    # ------------------------------------------------------------------ machinery

    def _model_op(
        self,
        action: str,
        name: str,
        caller: str | None,
        body: Callable[[ManagedModel[Any]], tuple[str, str, dict[str, Any]]],
    ) -> Operation:
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"name must be a model's name; got {name!r}")
        model, problem = self._find(name)
        if model is None:
            return self._run(action, name, caller, lambda: ("not_found", problem, {}), ())

        def run() -> tuple[str, str, dict[str, Any]]:
            # Mid-transition, the model's own calls would wait for it to settle:
            # answer now instead. Leases make them raise at once, naming the holders.
            busy = _in_transition(model)
            if busy is not None:
                return busy
            try:
                return body(model)
            except ModelBusyError as exc:
                return "busy", str(exc), {"leases": model.leases}

        return self._run(action, model.name, caller, run, (model.device,))

    def _find(self, name: str) -> tuple[ManagedModel[Any] | None, str]:
        models = self.models()
        found = [m for m in models if m.name == name]
        if not found and "/" in name:
            pool_name, _, model_name = name.partition("/")
            found = [
                m
                for m in models
                if m.name == model_name and m.pool is not None and m.pool.name == pool_name
            ]
        if len(found) == 1:
            return found[0], ""
        if found:
            qualified = ", ".join(
                f"{m.pool.name}/{m.name}" if m.pool is not None else m.name for m in found
            )
            return None, f"{len(found)} models are named {name!r}: name one of {qualified}"
        known = ", ".join(sorted({m.name for m in models})) or "none"
        return None, f"no model named {name!r}; known: {known}"

    def _run(
        self,
        action: str,
        model: str | None,
        caller: str | None,
        body: Callable[[], tuple[str, str, dict[str, Any]]],
        shown: tuple[Device, ...],
        *,
        layers: tuple[str, ...] = ("allocated", "process", "used"),
    ) -> Operation:
        if caller is not None and not isinstance(caller, str):
            raise InvalidArgumentError(f"caller must be a string or None; got {caller!r}")
        devices = self.devices()
        before = read_devices(devices)
        wall, started = time.time(), time.perf_counter()
        try:
            outcome, text, detail = body()
        except BudgetExceededError as exc:
            outcome, text, detail = "no_room", str(exc), {}
        except Exception as exc:  # reported as an outcome: a control must not crash its caller
            _log.debug("%s %s failed", action, model or "", exc_info=True)
            outcome, text, detail = "failed", f"{type(exc).__name__}: {exc}", {}
        seconds = time.perf_counter() - started
        after = read_devices(devices)
        if outcome == "ok":
            text += _came_back(before, after, shown, layers) + f", in {seconds:.2f} s"
        operation = Operation(
            action, outcome, text, caller, model, wall, seconds, before, after, detail
        )
        self._log.append(operation)
        return operation


_CACHE_LAYERS = ("reserved", "process", "used")


def _idle(model: ManagedModel[Any]) -> bool:
    return model.leases == 0 and model.state in (ModelState.READY, ModelState.OFFLOADED)


def _in_transition(model: ManagedModel[Any]) -> tuple[str, str, dict[str, Any]] | None:
    """``busy`` while ``model`` loads, wakes or unloads: acting now would wait for it."""
    state = model.state
    if state in _SETTLED:
        return None
    text = f"{model.name} is {state.value.lower()} right now; try again when it settles"
    return "busy", text, {"state": state.value}


def _came_back(
    before: MemorySnapshot,
    after: MemorySnapshot,
    shown: tuple[Device, ...],
    layers: tuple[str, ...],
) -> str:
    """``": cpu 12.0 MiB back (process)"``: the most telling layer that moved, per device."""
    parts = []
    for device in shown:
        name = str(device)
        if name not in before or name not in after:
            continue
        freed = DeviceMemoryDelta.between(before[name], after[name]).freed()
        for layer in layers:
            value = freed.get(layer)
            if value is not None:
                amount = (
                    f"{format_bytes(value)} back"
                    if value >= 0
                    else f"{format_bytes(-value)} more in use"
                )
                parts.append(f"{name} {amount} ({layer})")
                break
    return ": " + ", ".join(parts) if parts else ""


# ---------------------------------------------------------------------- watch

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
        controls: Controls,
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


def watch(
    threshold: float | None = 0.9,
    every: float | str | datetime.timedelta | None = "5min",
    action: Literal["clear_cache", "free"] | Callable[[], object] | None = "clear_cache",
    device: DeviceLike | list[DeviceLike] | None = None,
    *,
    check_every: float | str | datetime.timedelta = "5s",
    controls: Controls | None = None,
    name: str = "watch",
    clock: Callable[[], float] = time.monotonic,
    start: bool = True,
) -> Watch:
    """Alert when a device crosses a fraction of its memory, and clean up on a timer.

    Every ``check_every`` the devices are read; when one's used memory (driver
    or OS numbers, all processes: the memory line's figure) reaches
    ``threshold`` of its total, a ``"threshold"`` event is emitted and a
    warning logged, once per crossing (and an INFO event when it falls back
    under). Every ``every``, ``action`` runs through ``controls``, so it lands
    in the same operation log as the buttons. Both show in
    :meth:`Controls.status` and the HTTP API's ``/metrics``.

    Args:
        threshold: A fraction in (0, 1], or ``None`` for no alerts.
        every: How often the action runs: seconds, a timedelta, or ``"5min"``;
            ``None`` for no timed action.
        action: ``"clear_cache"`` (:meth:`Controls.clear_cache`), ``"free"``
            (:meth:`Controls.free`: evicts idle models too), a zero-argument
            callable, or ``None``. A ``"clear_cache"`` that does nothing on
            every watched device (a cpu-only machine) is not scheduled; the
            state says why.
        device: The device(s) to watch (default: every device in scope of ``controls``).
        check_every: How often the threshold is checked.
        controls: The :class:`Controls` actions run through (default: a new
            one over the whole process).
        name: The watch's name, used as the caller in the operation log.
        clock: Monotonic seconds (tests pass their own with ``start=False``).
        start: Run on a background thread; with ``False`` nothing runs by
            itself: call :meth:`Watch.run_due`.

    Returns:
        The running :class:`Watch` (also a context manager that stops it).

    Raises:
        InvalidArgumentError: A threshold outside (0, 1], bad durations, an
            unknown action, or neither a threshold nor a timed action.

    Example:
        >>> import vramkit
        >>> with vramkit.watch(threshold=0.95, every=None, device="cpu") as w:
        ...     w.state()["threshold"]
        0.95
    """
    if threshold is not None and (
        isinstance(threshold, bool)
        or not isinstance(threshold, int | float)
        or not 0 < threshold <= 1
    ):
        raise InvalidArgumentError(
            f"threshold must be a fraction of the device's total in (0, 1], or None; "
            f"got {threshold!r}"
        )
    interval = None if every is None else parse_seconds(every, what="every")
    if interval is not None and interval <= 0:
        raise InvalidArgumentError(f"every must be more than 0 seconds, or None; got {every!r}")
    if not (action is None or action in ("clear_cache", "free") or callable(action)):
        raise InvalidArgumentError(
            f"action must be 'clear_cache', 'free', a callable or None; got {action!r}"
        )
    if action is None:
        interval = None
    if threshold is None and interval is None:
        raise InvalidArgumentError("watch needs a threshold, or an action with every=, or both")
    checks = parse_seconds(check_every, what="check_every")
    if checks <= 0:
        raise InvalidArgumentError(f"check_every must be more than 0 seconds; got {check_every!r}")
    if controls is not None and not isinstance(controls, Controls):
        raise InvalidArgumentError(f"controls must be a Controls or None; got {controls!r}")
    if not isinstance(name, str) or not name:
        raise InvalidArgumentError(f"name must be a non-empty string; got {name!r}")
    controls = controls if controls is not None else Controls()
    devices = controls.devices() if device is None else target_devices(device)
    return Watch(
        controls,
        threshold=None if threshold is None else float(threshold),
        every=interval,
        action=action,
        devices=devices,
        check_every=checks,
        name=name,
        clock=clock,
        start=start,
    )
