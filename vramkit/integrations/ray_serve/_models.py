"""One replica's models: a byte-budgeted pool behind ``get_model``, borrowed per request.

:class:`MultiplexedModels` registers each model id with the replica's
:class:`~vramkit.ModelPool` on first sight, runs the loader in a worker thread,
lends the model until the request's task ends, reports the held ids to Serve
and logs and counts what the pool does (:class:`MultiplexStatus`).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any, Generic, Literal, TypeVar, cast

import vramkit
from vramkit import (
    InvalidArgumentError,
    ModelPool,
    ModelState,
    ModelStateError,
    PoolStatus,
    UnloadReport,
    events,
)
from vramkit.integrations.ray_serve._ray import (
    FREE_BYTES_STAT,
    _Metrics,
    _replica_context,
    _report_to_serve,
)

T = TypeVar("T")

EvictTo = Literal["auto", "cpu", "disk", "unload"]

# Serve's replica logger: what goes through it lands in the replica's log file,
# tagged with the deployment, replica and request ids.
_log = logging.getLogger("ray.serve")

_REPORT_INTERVAL_S = 0.1  # as often as Ray 2.60 pushes its multiplexed model ids


@dataclasses.dataclass(frozen=True)
class _Settings:
    """What the decorator was given, checked where it was applied."""

    budget: int | float | str | None
    device: Any
    evict_to: EvictTo
    headroom: int | str
    keep_alive: float | None
    timeout: float
    size_hint: Callable[[str], int | str | None] | None
    model_options: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class MultiplexStatus:
    """One replica's multiplexed models and what they cost, at one moment.

    Attributes:
        replica: Serve's replica id (``None`` outside a Serve replica).
        pool: The pool's accounting: budget, charged and peak bytes, each model.
        model_ids: The ids the replica reports to Serve's routers: loaded,
            loading, or offloaded to a tier.
        loads: Loads run by the loader.
        wakes: Models brought back from a tier instead of loaded.
        load_seconds: Wall time of all loads.
        wake_seconds: Wall time of all wakes.
        evictions: Evictions to make room, per tier (``"cpu"``, ``"disk"``, ``"unload"``).
        survivors: Unloads after which something else still held the model
            (named in the replica's log, and freed anyway).
    """

    replica: str | None
    pool: PoolStatus
    model_ids: tuple[str, ...]
    loads: int
    wakes: int
    load_seconds: float
    wake_seconds: float
    evictions: Mapping[str, int]
    survivors: int

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (what a deployment returns from a status route)."""
        data = dataclasses.asdict(self)
        data["evictions"] = dict(self.evictions)
        return data

    def __str__(self) -> str:
        tiers = ", ".join(f"{n} to {t}" for t, n in sorted(self.evictions.items())) or "none"
        return (
            f"replica {self.replica or '-'}: {self.loads} loads ({self.load_seconds:.2f} s), "
            f"{self.wakes} wakes ({self.wake_seconds:.2f} s), evictions: {tiers}\n{self.pool}"
        )


class _Borrowed:
    """A lease taken for a request, and the object it lent."""

    __slots__ = ("lease", "obj")

    def __init__(self, lease: Any, obj: Any) -> None:
        self.lease = lease
        self.obj = obj


class MultiplexedModels(Generic[T]):
    """The models one replica serves through one multiplexed loader, under one budget.

    ``self.get_model`` in a deployment decorated with :func:`vramkit_multiplexed`.
    Outside a Serve replica it works the same (nothing is reported to Serve),
    which is how tests and notebooks can exercise a deployment class directly.

    Args:
        load: The loader coroutine, bound to the deployment instance:
            ``await load(model_id)`` returns the model.
        settings: What the decorator was given.
    """

    def __init__(self, load: Callable[[str], Awaitable[T]], settings: _Settings) -> None:
        self._function: Callable[[str], Awaitable[T]] | None = load
        self._settings = settings
        self._origin: object = None  # the decorated loader that made these models
        context = _replica_context()
        self._replica_id = None if context is None else context.replica_id
        name = (
            f"{context.deployment}#{context.replica_tag}"
            if context is not None
            else getattr(load, "__qualname__", "multiplexed")
        )
        self._pool = ModelPool(
            settings.device,
            budget=settings.budget,
            headroom=settings.headroom,
            keep_alive=settings.keep_alive,
            timeout=settings.timeout,
            evict_to=settings.evict_to,
            name=name,
        )
        self._device = str(self._pool.device)
        self._lock = threading.Lock()
        self._waiting: collections.Counter[str] = collections.Counter()
        self._counts: collections.Counter[str] = collections.Counter()
        self._seconds = {"load": 0.0, "wake": 0.0}
        # Loads wait for room, and requests wait for loads: a thread each, of our
        # own, so they never starve the default executor the user's code shares.
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=64, thread_name_prefix=f"vramkit-multiplex-{name}"
        )
        self._metrics = _Metrics() if context is not None else None
        self._reporter: asyncio.Task[None] | None = None
        self._reported: tuple[str, ...] | None = None
        self._closed = False
        self._unsubscribe = events.subscribe(self._on_event)

    # -------------------------------------------------------------- borrowing

    async def __call__(self, model_id: str) -> T:
        """Load (or wake) ``model_id`` if needed and return it, borrowed until this task ends.

        The borrow ends in the task's done callback: for whoever awaits the
        task, one event-loop iteration after the await returns.

        Raises:
            InvalidArgumentError: ``model_id`` is not a non-empty string.
            BudgetExceededError: No room could be made within ``timeout``.
        """
        borrowed = await self._borrow(model_id)
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - a coroutine awaited outside any task
            self._give_back(borrowed.lease, None)
            raise InvalidArgumentError("get_model must be awaited inside an asyncio task")
        task.add_done_callback(functools.partial(self._return_at_end, borrowed.lease))
        return cast("T", borrowed.obj)

    def use(self, model_id: str) -> _Use[T]:
        """Borrow a model for a block: ``async with self.get_model.use(model_id) as model:``.

        For long-lived tasks (a streaming response, a background loop) that
        should not hold the model until they end. An out-of-memory error in the
        block evicts the other idle models before it propagates.
        """
        return _Use(self, model_id)

    async def _borrow(self, model_id: str) -> _Borrowed:
        if not isinstance(model_id, str) or not model_id:
            raise InvalidArgumentError(f"the model id must be a non-empty string; got {model_id!r}")
        if self._closed:
            raise ModelStateError(f"the models of {self._pool.name} are shut down")
        self._start_reporting()
        if self._metrics is not None:
            self._metrics.requests.inc()
        self._register(model_id)
        loop = asyncio.get_running_loop()
        try:
            for attempt in (1, 2):
                lease = self._pool.use(model_id)
                # Always off the event loop, even for a loaded model: one evicted between
                # a check here and the lease would load or wait for room on the loop,
                # and room comes back through leases returned on that same loop.
                taking = self._executor.submit(contextvars.copy_context().run, lease.__enter__)
                try:
                    obj = await asyncio.wrap_future(taking)
                except asyncio.CancelledError:
                    # The request was cancelled (its client went away) while the worker
                    # thread loads or waits: the lease it still takes must come back.
                    if not taking.cancel():
                        taking.add_done_callback(functools.partial(_return_if_taken, lease))
                    raise
                except BaseException as exc:
                    if attempt == 2 or not vramkit.is_oom_error(exc):
                        raise
                    # The load ran out of memory: evict the other idle models, clean up,
                    # and try once more, as ModelPool.call does for work inside a lease.
                    await loop.run_in_executor(self._executor, self._make_room, model_id)
                    continue
                return _Borrowed(lease, obj)
            raise AssertionError("unreachable")  # pragma: no cover
        finally:
            self._done_waiting(model_id)

    def _register(self, model_id: str) -> None:
        """Count a request waiting for ``model_id``, giving the id a model on first sight."""
        with self._lock:
            self._waiting[model_id] += 1
            if model_id in self._pool:
                return
            hint = self._settings.size_hint(model_id) if self._settings.size_hint else None
            try:
                self._pool.register(
                    model_id,
                    functools.partial(self._run_loader, model_id),
                    size_hint=hint,
                    inference_mode=False,
                    **self._settings.model_options,
                )
            except BaseException:
                self._waiting[model_id] -= 1
                raise

    def _done_waiting(self, model_id: str) -> None:
        """Forget a model that never loaded once nobody waits for it (a bad id from a client)."""
        with self._lock:
            self._waiting[model_id] -= 1
            if self._waiting[model_id] > 0:
                return
            del self._waiting[model_id]
            if model_id not in self._pool:
                return
            model = self._pool[model_id]
            if model.stats.loads == 0 and model.state is ModelState.UNLOADED:
                self._pool.remove(model_id)

    def _run_loader(self, model_id: str) -> T:
        """The ManagedModel loader: run the user's coroutine to completion in this thread."""
        function = self._function
        if function is None:
            raise ModelStateError(f"the models of {self._pool.name} are shut down")
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return asyncio.run(_awaited(function(model_id)))
        # On an event loop's own thread (the pool used directly from a coroutine):
        # a loop cannot wait for itself, so the coroutine gets a thread of its own.
        with concurrent.futures.ThreadPoolExecutor(1) as one:
            return one.submit(asyncio.run, _awaited(function(model_id))).result()

    def _return_at_end(self, lease: Any, task: asyncio.Task[Any]) -> None:
        error = None if task.cancelled() else task.exception()
        self._give_back(lease, error)

    def _give_back(
        self, lease: Any, error: BaseException | None
    ) -> concurrent.futures.Future[None] | None:
        """Return a lease; after an out-of-memory error, make room in a worker thread."""
        if error is not None and vramkit.is_oom_error(error):
            return self._executor.submit(lease.__exit__, type(error), error, error.__traceback__)
        lease.__exit__(None, None, None)
        return None

    def _make_room(self, model_id: str) -> None:
        self._pool.evict_idle(exclude=[model_id])
        vramkit.cleanup(self._pool.device)

    # -------------------------------------------------------------- administration

    async def unload(self, model_id: str) -> UnloadReport:
        """Unload one model now, waiting (up to ``timeout``) for requests that borrowed it.

        Not from a request that borrowed the same model itself: that lease ends
        with the request, so the wait would only time out.

        Returns:
            The :class:`~vramkit.UnloadReport`; holders it names are also logged.
        """
        model = self._pool[model_id]
        # Not on our executor: its threads take the requests' leases, and a model
        # refuses to unload from a thread that holds one of its leases.
        return await asyncio.to_thread(model.unload, timeout=self._settings.timeout)

    @property
    def pool(self) -> ModelPool:
        """The replica's :class:`~vramkit.ModelPool` (one model per id seen)."""
        return self._pool

    def model_ids(self) -> list[str]:
        """The ids this replica reports to Serve's routers, sorted.

        Loaded and loading models, and models offloaded to a tier: waking one
        here beats loading it on another replica.
        """
        gone = (ModelState.UNLOADED, ModelState.UNLOADING)
        return sorted(m.name for m in self._pool if m.state not in gone)

    def routing_stats(self) -> dict[str, Any]:
        """What this replica tells routers about its memory.

        The decorator gives the deployment class a ``record_routing_stats``
        method returning this (unless the class has its own: then merge this
        dict into its answer), which Serve polls for its routers.

        Returns:
            ``{FREE_BYTES_STAT: bytes left in the budget, "vramkit_budget_bytes":
            ..., "vramkit_charged_bytes": ...}``, all ints.
        """
        status = self._pool.status()
        return {
            FREE_BYTES_STAT: max(status.budget_bytes - status.charged_bytes, 0),
            "vramkit_budget_bytes": status.budget_bytes,
            "vramkit_charged_bytes": status.charged_bytes,
        }

    def status(self) -> MultiplexStatus:
        """The replica's budget, each model's state and bytes, loads vs wakes, evictions."""
        with self._lock:
            counts = dict(self._counts)
            seconds = dict(self._seconds)
        return MultiplexStatus(
            replica=None if self._replica_id is None else self._replica_id.unique_id,
            pool=self._pool.status(),
            model_ids=tuple(self.model_ids()),
            loads=counts.get("load", 0),
            wakes=counts.get("wake", 0),
            load_seconds=seconds["load"],
            wake_seconds=seconds["wake"],
            evictions={k[len("evict:") :]: v for k, v in counts.items() if k.startswith("evict:")},
            survivors=counts.get("survivor", 0),
        )

    async def shutdown(self) -> None:
        """Unload every model (waiting for borrowed ones) and stop reporting; idempotent.

        Serve calls this when the replica stops.
        """
        reporter, self._reporter = self._reporter, None
        if reporter is not None:
            reporter.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self.close)

    def close(self) -> None:
        """:meth:`shutdown` for synchronous callers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._pool.close()
        self._unsubscribe()
        self._executor.shutdown(wait=False)
        self._function = None  # the bound loader holds the deployment instance

    # -------------------------------------------------------------- events, logs, metrics

    def _on_event(self, event: events.Event) -> None:
        if event.device != self._device or event.model not in self._pool:
            return
        kind = event.kind
        survived = kind == "unload" and event.detail.get("died") is False
        with self._lock:
            if kind in ("load", "wake"):
                self._counts[kind] += 1
                self._seconds[kind] += event.seconds
            elif kind == "evict":
                self._counts[f"evict:{event.detail.get('tier')}"] += 1
            if survived:
                self._counts["survivor"] += 1
        if survived:
            held = "; ".join(event.detail.get("held_by", ())) or "a holder vramkit could not find"
            _log.warning(
                "model %r survived unloading: held by %s; %s freed anyway, and the stale "
                "reference now fails loudly: borrow models through get_model instead of "
                "keeping them",
                event.model,
                held,
                vramkit.format_bytes(event.detail.get("neutralised_bytes", 0)),
            )
        elif kind in ("load", "wake", "evict", "offload", "unload", "expire", "oom", "load_failed"):
            _log.info("vramkit: %s", event.describe())
        if self._metrics is not None:
            self._metrics.record(event)

    def _start_reporting(self) -> None:
        if self._reporter is None and self._replica_id is not None and not self._closed:
            self._reporter = asyncio.get_running_loop().create_task(self._report_forever())

    async def _report_forever(self) -> None:
        failing = False
        while True:
            try:
                self._report()
                failing = False
            except Exception:  # reporting must never take the replica down
                if not failing:  # once per outage, not ten times a second
                    _log.warning("vramkit could not report to Serve", exc_info=True)
                failing = True
            await asyncio.sleep(_REPORT_INTERVAL_S)

    def _report(self) -> None:
        """Push the held model ids when they change; refresh the metrics."""
        ids = tuple(self.model_ids())
        last = self._reported
        if ids != last:
            _report_to_serve(self._replica_id, list(ids))
            self._reported = ids
        if self._metrics is not None:
            self._metrics.report(self._pool.status(), ids, last or ())


def _return_if_taken(lease: Any, taking: concurrent.futures.Future[Any]) -> None:
    if not taking.cancelled() and taking.exception() is None:
        lease.__exit__(None, None, None)


async def _awaited(awaitable: Awaitable[T]) -> T:
    return await awaitable


class _Use(Generic[T]):
    """``async with models.use(model_id) as model:`` (see :meth:`MultiplexedModels.use`)."""

    __slots__ = ("_borrowed", "_model_id", "_models")

    def __init__(self, models: MultiplexedModels[T], model_id: str) -> None:
        self._models = models
        self._model_id = model_id
        self._borrowed: _Borrowed | None = None

    async def __aenter__(self) -> T:
        self._borrowed = await self._models._borrow(self._model_id)
        return cast("T", self._borrowed.obj)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        borrowed, self._borrowed = self._borrowed, None
        if borrowed is None:
            return
        borrowed.obj = None
        making_room = self._models._give_back(borrowed.lease, exc)
        if making_room is not None:
            await asyncio.wrap_future(making_room)
