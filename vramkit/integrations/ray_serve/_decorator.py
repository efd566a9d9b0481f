"""The decorator: ``@vramkit_multiplexed`` checks its arguments and gives each replica its models.

:func:`vramkit_multiplexed` turns ``async def get_model(self, model_id)`` into a
descriptor (``_MultiplexedLoader``) that makes one
:class:`~vramkit.integrations.ray_serve.MultiplexedModels` per deployment
instance, where Ray 2.60 awaits its ``shutdown()``, and gives the class the
``record_routing_stats`` method Serve polls.
"""

from __future__ import annotations

import functools
import inspect
import threading
from collections.abc import Awaitable, Callable
from typing import Any, Generic, cast, overload

import torch

import vramkit
from vramkit import InvalidArgumentError, ManagedModel
from vramkit.integrations.ray_serve._models import EvictTo, MultiplexedModels, T, _Settings
from vramkit.integrations.ray_serve._ray import _RAY_SHUTDOWN_ATTR

# The deployment method Serve polls every `request_routing_stats_period_s` (public API).
_ROUTING_STATS_METHOD = "record_routing_stats"
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
