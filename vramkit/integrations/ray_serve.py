"""Ray Serve model multiplexing with a memory budget per replica.

Ray Serve's ``@serve.multiplexed(max_num_models_per_replica=3)`` caches a
replica's models by *count*: three small models and three large ones count the
same, eviction calls the model's ``__del__`` and hopes, and one lock per
replica serialises every load. :func:`vramkit_multiplexed` is a drop-in on the
same ``async def get_model(self, model_id)`` whose cache is a
:class:`~vramkit.ModelPool` with a byte budget: models are admitted by size,
evicted to the cheapest tier (or unloaded, with vramkit's proof of release),
expire after ``keep_alive``, load concurrently when they differ, and recover
from out-of-memory errors. The replica still reports the model ids it holds, so
Serve keeps routing each request to a replica that has its model::

    from ray import serve
    from vramkit.integrations.ray_serve import vramkit_multiplexed

    @serve.deployment(num_replicas=2)
    class Models:
        @vramkit_multiplexed(budget="20GiB", device="cuda")
        async def get_model(self, model_id: str):
            return load_my_model(model_id).to("cuda")

        async def __call__(self, request):
            model = await self.get_model(serve.get_multiplexed_model_id())
            return model(await request.json())

Placement by memory across replicas: each replica also reports its free budget
(:data:`FREE_BYTES_STAT`, through the ``record_routing_stats`` method the
decorator gives the deployment), and :class:`MemoryAwareRequestRouter` sends a
model id that no replica holds to the replica with the most room, instead of to
the one with the fewest models.

Needs the ``ray`` extra: ``pip install "vramkit[ray]"``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextvars
import dataclasses
import functools
import inspect
import logging
import math
import random
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Generic, Literal, Protocol, TypeVar, cast, overload

import torch

import vramkit
from vramkit import (
    InvalidArgumentError,
    ManagedModel,
    MissingDependencyError,
    ModelPool,
    ModelState,
    ModelStateError,
    PoolStatus,
    UnloadReport,
    events,
)

try:
    from ray import serve
    from ray.serve.request_router import (
        FIFOMixin,
        MultiplexMixin,
        PendingRequest,
        RequestRouter,
        RunningReplica,
    )
except ImportError as exc:  # pragma: no cover - exercised where ray is not installed
    if exc.name is not None and exc.name.partition(".")[0] != "ray":
        raise  # ray is there but one of *its* imports failed: show that
    raise MissingDependencyError("ray", "ray", "vramkit.integrations.ray_serve") from exc

__all__ = [
    "FREE_BYTES_STAT",
    "MemoryAwareRequestRouter",
    "MultiplexStatus",
    "MultiplexedModels",
    "rank_replicas_by_memory",
    "vramkit_multiplexed",
]

T = TypeVar("T")
R = TypeVar("R", bound="_ReplicaView")

EvictTo = Literal["auto", "cpu", "disk", "unload"]

FREE_BYTES_STAT = "vramkit_free_bytes"
"""The routing-stats key under which a replica reports the bytes left in its budget."""

# Serve's replica logger: what goes through it lands in the replica's log file,
# tagged with the deployment, replica and request ids.
_log = logging.getLogger("ray.serve")

_REPORT_INTERVAL_S = 0.1  # as often as Ray 2.60 pushes its multiplexed model ids
# The deployment method Serve polls every `request_routing_stats_period_s` (public API).
_ROUTING_STATS_METHOD = "record_routing_stats"
_LATENCY_BUCKETS_MS = [10.0, 50.0, 100.0, 250.0, 500.0, 1e3, 2.5e3, 5e3, 1e4, 3e4, 6e4]
# What ManagedModel options the decorator sets itself, with why the caller cannot.
_RESERVED_OPTIONS = {
    "loader": "the decorated coroutine is the loader",
    "name": "the model id is the name",
    "device": "pass device= to the decorator",
    "keep_alive": "pass keep_alive= to the decorator",
    "size_hint": "pass size_hint= (a function of the model id) to the decorator",
    "inference_mode": (
        "requests borrow models across awaits, where grad mode cannot follow them; "
        "use `with torch.inference_mode():` around the forward pass"
    ),
}


# ------------------------------------------------------------------ Ray internals (2.60)
# Two things a multiplexed loader needs have no public API in Ray Serve 2.60; both
# are read from ray/serve/multiplex.py (_ModelMultiplexWrapper) and replica.py of
# that version, and kept to these few lines.

# Ray 2.60's replica awaits `shutdown()` of the object under this attribute of the
# deployment instance when the replica stops (replica.py, call_destructor).
_RAY_SHUTDOWN_ATTR = "__serve_multiplex_wrapper"


def _report_to_serve(replica_id: Any, model_ids: list[str]) -> None:
    """Tell Serve's controller which model ids this replica holds.

    Ray 2.60 does exactly this in ``_ModelMultiplexWrapper._push_model_ids_info``:
    the controller hands the ids to every router of the deployment, which then
    sends requests for a model to the replicas that report it. (Routing stats
    sent this way would be overwritten at the controller's next health check:
    they travel through ``record_routing_stats`` instead.)
    """
    from ray.serve._private.common import RequestRoutingInfo
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    if client is not None:  # it raises rather than answer None when asked the default way
        client.record_request_routing_info(
            RequestRoutingInfo(replica_id=replica_id, multiplexed_model_ids=model_ids)
        )


# ------------------------------------------------------------------ the decorator


@dataclasses.dataclass(frozen=True)
class _Settings:
    budget: int | float | str | None
    device: Any
    evict_to: EvictTo
    headroom: int | str
    keep_alive: float | None
    timeout: float
    size_hint: Callable[[str], int | str | None] | None
    model_options: Mapping[str, Any]


@overload
def vramkit_multiplexed(func: Callable[..., Awaitable[T]], /) -> _MultiplexedLoader[T]: ...
@overload
def vramkit_multiplexed(
    func: None = None,
    /,
    *,
    budget: int | float | str | None = None,
    device: str | int | torch.device | None = None,
    evict_to: EvictTo = "auto",
    headroom: int | str = "512MiB",
    keep_alive: float | None = None,
    timeout: float = 30.0,
    size_hint: Callable[[str], int | str | None] | None = None,
    **model_options: Any,
) -> Callable[[Callable[..., Awaitable[T]]], _MultiplexedLoader[T]]: ...
def vramkit_multiplexed(
    func: Callable[..., Awaitable[T]] | None = None,
    /,
    *,
    budget: int | float | str | None = None,
    device: str | int | torch.device | None = None,
    evict_to: EvictTo = "auto",
    headroom: int | str = "512MiB",
    keep_alive: float | None = None,
    timeout: float = 30.0,
    size_hint: Callable[[str], int | str | None] | None = None,
    **model_options: Any,
) -> _MultiplexedLoader[T] | Callable[[Callable[..., Awaitable[T]]], _MultiplexedLoader[T]]:
    """Cache a replica's multiplexed models under a byte budget (for ``@serve.multiplexed``).

    Decorates the same ``async def get_model(self, model_id: str)`` (or a plain
    ``async def get_model(model_id: str)`` for function deployments). Each
    replica gets its own :class:`~vramkit.ModelPool`; ``await
    self.get_model(model_id)`` returns the loaded model and borrows it until
    the calling task (in Serve, the request) ends, so no other request can
    evict it mid-forward. ``self.get_model`` is the replica's
    :class:`MultiplexedModels` (``.status()``, ``.use()``, ``.unload()``, ``.pool``).

    The loader coroutine runs in a worker thread, on an event loop of its own:
    a slow load blocks neither the replica's other requests nor the loads of
    other models. Objects bound to the replica's event loop (an ``aiohttp``
    session made in ``__init__``) cannot be used inside it.

    Args:
        func: The loader coroutine, when used bare (``@vramkit_multiplexed``).
        budget: Bytes each replica may hold on ``device``: an int, a string such
            as ``"20GiB"``, a fraction of the device's total in (0, 1], or
            ``None`` for the driver's free memory (see :class:`~vramkit.ModelPool`).
            Replicas sharing one GPU need a budget each.
        device: Where the loader puts the models (default: the best available).
        evict_to: ``"auto"`` (each model's cheapest tier from its measured
            costs), ``"cpu"``, ``"disk"`` or ``"unload"``.
        headroom: Bytes kept free beyond each model's reservation.
        keep_alive: Idle seconds before a model unloads (``None``: never).
        timeout: Seconds a load waits for borrowed models to come back before
            :class:`~vramkit.BudgetExceededError`.
        size_hint: ``model_id -> bytes`` (or ``"1.5GiB"``, or ``None``) before a
            model's first load, so it is admitted by size instead of evicting
            every idle model to make room for an unknown one.
        **model_options: Passed to each :class:`~vramkit.ManagedModel`
            (``offload_dir``, ``strict``, ``free_survivors``, ...).

    Returns:
        The decorated loader (or, with arguments, a decorator that makes one).

    Raises:
        InvalidArgumentError: A bad argument, or a loader that is not an
            ``async def`` taking the model id.
    """
    settings = _settings(
        budget, device, evict_to, headroom, keep_alive, timeout, size_hint, model_options
    )

    def decorate(function: Callable[..., Awaitable[T]]) -> _MultiplexedLoader[T]:
        return _MultiplexedLoader(function, settings)

    return decorate(func) if func is not None else decorate


def _settings(
    budget: object,
    device: object,
    evict_to: object,
    headroom: object,
    keep_alive: object,
    timeout: object,
    size_hint: object,
    model_options: dict[str, Any],
) -> _Settings:
    """Check the decorator's arguments where it is applied, not at the first request."""
    if isinstance(budget, bool) or not (budget is None or isinstance(budget, int | float | str)):
        raise InvalidArgumentError(
            f"budget must be bytes, a string like '20GiB', a fraction in (0, 1] or None; "
            f"got {budget!r}"
        )
    if isinstance(budget, int | str):
        vramkit.parse_bytes(budget, what="budget")
    elif isinstance(budget, float) and not 0 < budget <= 1:
        raise InvalidArgumentError(
            f"budget as a fraction of the device must be in (0, 1]; got {budget!r}"
        )
    if not isinstance(headroom, int | str) or isinstance(headroom, bool):
        raise InvalidArgumentError(
            f"headroom must be bytes or a string like '512MiB'; got {headroom!r}"
        )
    vramkit.parse_bytes(headroom, what="headroom")
    if device is not None and not isinstance(device, str | int | torch.device):
        raise InvalidArgumentError(f"device must be a device name like 'cuda:0'; got {device!r}")
    if evict_to not in ("auto", "cpu", "disk", "unload"):
        raise InvalidArgumentError(
            f"evict_to must be 'auto', 'cpu', 'disk' or 'unload'; got {evict_to!r}"
        )
    for what, value in (("keep_alive", keep_alive), ("timeout", timeout)):
        if what == "keep_alive" and value is None:
            continue  # never expire
        if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
            raise InvalidArgumentError(f"{what} must be seconds >= 0; got {value!r}")
    if size_hint is not None and not callable(size_hint):
        raise InvalidArgumentError(
            f"size_hint must be a function of the model id returning bytes; got {size_hint!r}"
        )
    for option in model_options:
        if option in _RESERVED_OPTIONS:
            raise InvalidArgumentError(f"{option}= is not accepted: {_RESERVED_OPTIONS[option]}")
    accepted = inspect.signature(ManagedModel).parameters
    unknown = sorted(set(model_options) - set(accepted))
    if unknown:
        hint = (
            " (the budget is in bytes: budget= replaces max_num_models_per_replica)"
            if "max_num_models_per_replica" in unknown
            else ""
        )
        raise InvalidArgumentError(f"unknown options {unknown}{hint}")
    return _Settings(
        budget=budget,
        device=device,
        evict_to=evict_to,
        headroom=headroom,
        keep_alive=None if keep_alive is None else float(cast("float", keep_alive)),
        timeout=float(cast("float", timeout)),
        size_hint=cast("Callable[[str], int | str | None] | None", size_hint),
        model_options=dict(model_options),
    )


class _MultiplexedLoader(Generic[T]):
    """What :func:`vramkit_multiplexed` returns: a descriptor giving each instance its models."""

    def __init__(self, function: Callable[..., Awaitable[T]], settings: _Settings) -> None:
        if not inspect.iscoroutinefunction(function):
            raise InvalidArgumentError(
                f"@vramkit_multiplexed decorates an `async def` loader; got {function!r}"
            )
        parameters = len(inspect.signature(function).parameters)
        if parameters not in (1, 2):
            raise InvalidArgumentError(
                "@vramkit_multiplexed decorates `async def get_model(self, model_id)` or "
                f"`async def get_model(model_id)`; {function.__qualname__} takes {parameters} "
                "parameters"
            )
        self._function = function
        self._settings = settings
        self._standalone: MultiplexedModels[T] | None = None  # function deployments
        functools.update_wrapper(self, function)

    def __set_name__(self, owner: type, name: str) -> None:
        # Serve polls a deployment's `record_routing_stats` and hands the answer to
        # its routers: give the class one reporting the free budget, unless it has one.
        if hasattr(owner, _ROUTING_STATS_METHOD):
            return

        def record_routing_stats(instance: object) -> dict[str, Any]:
            return self._models_of(instance).routing_stats()

        record_routing_stats.__qualname__ = f"{owner.__qualname__}.{_ROUTING_STATS_METHOD}"
        setattr(owner, _ROUTING_STATS_METHOD, record_routing_stats)

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> _MultiplexedLoader[T]: ...
    @overload
    def __get__(self, instance: object, owner: type | None = None) -> MultiplexedModels[T]: ...
    def __get__(
        self, instance: object | None, owner: type | None = None
    ) -> _MultiplexedLoader[T] | MultiplexedModels[T]:
        if instance is None:
            return self
        return self._models_of(instance)

    async def __call__(self, *args: Any) -> T:
        """Function deployments: ``await get_model(model_id)``."""
        if len(args) == 2:  # called through the class: Models.get_model(self, model_id)
            return await self._models_of(args[0])(args[1])
        if len(args) != 1:
            raise InvalidArgumentError(f"get_model takes the model id only; got {args!r}")
        with _create_lock:
            if self._standalone is None:
                self._standalone = MultiplexedModels(self._function, self._settings)
        return await self._standalone(args[0])

    def _models_of(self, instance: object) -> MultiplexedModels[T]:
        state = vars(instance)
        models = state.get(_RAY_SHUTDOWN_ATTR)
        if models is None:
            with _create_lock:
                models = state.get(_RAY_SHUTDOWN_ATTR)
                if models is None:
                    bound = self._function.__get__(instance, type(instance))
                    models = MultiplexedModels(bound, self._settings)
                    models._origin = self
                    state[_RAY_SHUTDOWN_ATTR] = models
        if not isinstance(models, MultiplexedModels) or models._origin is not self:
            raise InvalidArgumentError(
                f"{type(instance).__name__} has two multiplexed loaders; Ray Serve (and "
                "vramkit) support one per deployment"
            )
        return models

    def __getstate__(self) -> dict[str, Any]:
        # Serve pickles the deployment class; a replica's models never travel with it.
        return {**self.__dict__, "_standalone": None}


_create_lock = threading.Lock()


# ------------------------------------------------------------------ one replica's models


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


def _replica_context() -> Any:
    """Serve's replica context, or ``None`` outside a replica."""
    try:
        return serve.get_replica_context()
    except Exception:  # RayServeException outside a replica
        return None


class _Metrics:
    """Ray's multiplexing metrics, under their Ray names, plus vramkit's (only in a replica)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "serve_multiplexed_get_model_requests_counter",
            description="The counter for get model requests on the current replica.",
        )
        self.loads = metrics.Counter(
            "serve_multiplexed_models_load_counter",
            description="The counter for loaded models on the current replica.",
        )
        self.unloads = metrics.Counter(
            "serve_multiplexed_models_unload_counter",
            description="The counter for unloaded models on the current replica.",
        )
        self.load_ms = metrics.Histogram(
            "serve_multiplexed_model_load_latency_ms",
            description="The time it takes to load a model.",
            boundaries=_LATENCY_BUCKETS_MS,
        )
        self.unload_ms = metrics.Histogram(
            "serve_multiplexed_model_unload_latency_ms",
            description="The time it takes to unload a model.",
            boundaries=_LATENCY_BUCKETS_MS,
        )
        self.count = metrics.Gauge(
            "serve_num_multiplexed_models",
            description="The number of models loaded on the current replica.",
        )
        self.registered = metrics.Gauge(
            "serve_registered_multiplexed_model_id",
            description="The model id registered on the current replica.",
            tag_keys=("model_id",),
        )
        self.wake_ms = metrics.Histogram(
            "vramkit_multiplexed_model_wake_latency_ms",
            description="The time it takes to wake a model from an offload tier.",
            boundaries=_LATENCY_BUCKETS_MS,
            tag_keys=("tier",),
        )
        self.evictions = metrics.Counter(
            "vramkit_multiplexed_evictions",
            description="Models evicted to make room, by tier (cpu, disk, unload).",
            tag_keys=("tier",),
        )
        self.survivors = metrics.Counter(
            "vramkit_multiplexed_unload_survivors",
            description="Unloads after which user code still held the model (freed anyway).",
        )
        self.model_bytes = metrics.Gauge(
            "vramkit_multiplexed_model_bytes",
            description="Device bytes each model holds on the current replica.",
            tag_keys=("model_id",),
        )
        self.budget = metrics.Gauge(
            "vramkit_multiplexed_budget_bytes", description="The replica's memory budget."
        )
        self.charged = metrics.Gauge(
            "vramkit_multiplexed_charged_bytes",
            description="Bytes the replica's models hold or reserve against the budget.",
        )

    def record(self, event: events.Event) -> None:
        kind = event.kind
        if kind == "load":
            self.loads.inc()
            self.load_ms.observe(event.seconds * 1000)
        elif kind == "wake":
            self.wake_ms.observe(event.seconds * 1000, tags={"tier": str(event.detail.get("tier"))})
        elif kind in ("evict", "expire"):
            self.unloads.inc()
            self.unload_ms.observe(event.seconds * 1000)
            if kind == "evict":
                self.evictions.inc(tags={"tier": str(event.detail.get("tier"))})
        elif kind == "unload" and event.detail.get("died") is False:
            self.survivors.inc()

    def report(self, status: PoolStatus, ids: Sequence[str], before: Sequence[str]) -> None:
        self.count.set(len(ids))
        for model_id in set(before) - set(ids):
            self.registered.set(0, tags={"model_id": model_id})
        for model_id in ids:
            self.registered.set(1, tags={"model_id": model_id})
        for model in status.models:
            self.model_bytes.set(model.device_bytes, tags={"model_id": model.name})
        self.budget.set(status.budget_bytes)
        self.charged.set(status.charged_bytes)


# ------------------------------------------------------------------ placement by memory


class _ReplicaView(Protocol):
    @property
    def multiplexed_model_ids(self) -> set[str]: ...
    @property
    def routing_stats(self) -> dict[str, Any]: ...


def rank_replicas_by_memory(replicas: Sequence[R], model_id: str) -> list[list[R]]:
    """Order replicas for a request: those holding ``model_id``, then by free budget.

    The replicas that report ``model_id`` come first, together (Serve picks
    the least busy of a rank). The others follow one free-bytes level per rank,
    most room first, so a model no replica holds goes where it fits instead of
    evicting on a full replica. A replica that has not reported its budget yet
    counts as empty. A request without a model id may go anywhere: one rank.
    Replicas within a rank come in random order.

    Args:
        replicas: Objects with ``multiplexed_model_ids`` and ``routing_stats``
            (Serve's :class:`~ray.serve.request_router.RunningReplica`).
        model_id: The request's model id (``""`` when it has none).

    Returns:
        Ranks of replicas, the most preferred first; empty ranks are left out.
    """
    if not model_id:  # nothing to load: any replica will do
        ranks = [list(replicas)] if replicas else []
    else:
        holders = [r for r in replicas if model_id in r.multiplexed_model_ids]
        by_room: dict[float, list[R]] = {}
        for replica in replicas:
            if model_id not in replica.multiplexed_model_ids:
                by_room.setdefault(_free_bytes(replica), []).append(replica)
        ranks = [holders] if holders else []
        ranks += [by_room[room] for room in sorted(by_room, reverse=True)]
    for rank in ranks:
        # Serve takes the least busy replica of a rank and the first one on a tie:
        # shuffled, equal replicas share the new models instead of one taking them all.
        random.shuffle(rank)
    return ranks


def _free_bytes(replica: _ReplicaView) -> float:
    value = replica.routing_stats.get(FREE_BYTES_STAT)
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return math.inf


class MemoryAwareRequestRouter(FIFOMixin, MultiplexMixin, RequestRouter):
    """A Serve request router that places new model ids on the replica with the most room.

    Requests for a model go to the replicas that hold it, as with Serve's own
    router; a model no replica holds goes to the replica reporting the most free
    budget (:data:`FREE_BYTES_STAT`, sent by :func:`vramkit_multiplexed`), not to the
    one with the fewest models. Serve asks replicas for that figure every
    ``request_routing_stats_period_s`` (10 s unless configured), so set it to
    how stale a placement may be::

        from ray.serve.config import RequestRouterConfig

        @serve.deployment(
            num_replicas=2,
            request_router_config=RequestRouterConfig(
                request_router_class=MemoryAwareRequestRouter,
                request_routing_stats_period_s=1,
            ),
        )
    """

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        """Rank the candidates for one request (see :func:`rank_replicas_by_memory`)."""
        model_id = ""
        if pending_request is not None:
            model_id = pending_request.metadata.multiplexed_model_id or ""
            # When every rank is busy, back off before the next round, as Serve's
            # own routers do; without this flag it would retry at once.
            pending_request.routing_context.should_backoff = True
        return rank_replicas_by_memory(candidate_replicas, model_id)
