"""The operations themselves: :class:`Controls` over pools and models, and :func:`watch`.

Each operation runs synchronously on the models in scope and returns an
:class:`~vramkit.controls.Operation` saying what came back, in bytes; a busy
model is an outcome, never an exception and never a wait. :func:`watch`
starts a :class:`~vramkit.controls.Watch` whose action runs through them.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import Any, Literal

from vramkit._units import format_bytes, parse_seconds
from vramkit.cleaning import cleanup
from vramkit.controls._operations import Operation, OperationLog, _log, memory_line
from vramkit.controls._watch import Watch, live_watches
from vramkit.devices import Device, DeviceLike, DeviceMemory, available_devices, resolve_device
from vramkit.errors import BudgetExceededError, InvalidArgumentError, ModelBusyError, OffloadError
from vramkit.memory import DeviceMemoryDelta, MemorySnapshot, read_devices, target_devices
from vramkit.model import ManagedModel, ModelState, live_models
from vramkit.pool import ModelPool, live_pools

ACTIONS = ("free", "clear_cache", "unload", "offload_cpu", "offload_disk", "wake")
"""What :meth:`Controls.capabilities` answers for (offload is one action per tier)."""

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

_SETTLED = (ModelState.UNLOADED, ModelState.READY, ModelState.OFFLOADED)


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
