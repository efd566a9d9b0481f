"""Borrowing a managed model: leases, the inference-mode guard, and ``@mm.inference`` functions.

A lease is what ``mm.use()`` returns; an :class:`InferenceFunction` is what
``@mm.inference`` returns. Both borrow through :class:`Borrowable`, the part
of a ``ManagedModel`` that counts leases and loads (or wakes) the model first.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import torch

from vramkit._units import check_flag

if TYPE_CHECKING:
    from vramkit.cleaning import CleanupPolicy, CleanupTracker
    from vramkit.devices import Device

__all__ = ["Borrowable", "InferenceFunction", "Lease", "inference_guard"]

T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)
R = TypeVar("R")


class Borrowable(Protocol[T_co]):
    """What a lease needs of the model it borrows: a ``ManagedModel`` answers it."""

    @property
    def name(self) -> str:
        """The model's name."""
        ...

    @property
    def device(self) -> Device:
        """Its device (for the cleanup policy of ``@inference`` functions)."""
        ...

    @property
    def inference_mode(self) -> bool:
        """Whether synchronous leases run under ``torch.inference_mode()``."""
        ...

    def _acquire(self, pool: object = None) -> tuple[T_co, int]:
        """Take a lease, loading or waking first: the object and the lease's token.

        ``pool``: the pool the lease goes through; refused once the model left it.
        """
        ...

    def _try_acquire(self, task: object, pool: object) -> tuple[T_co, int] | None:
        """A lease owned by ``task`` if the model is ready now, without waiting; else ``None``."""
        ...

    def _ensure_ready(self, pool: object = None) -> None:
        """Load or wake the model (or wait for another thread to) without taking a lease."""
        ...

    def _return(self, token: int) -> None:
        """End the lease ``token``."""
        ...

    def _cleanup_tracker(self) -> CleanupTracker | None:
        """The model's own cleanup counters, if it has a policy."""
        ...


def inference_guard() -> object:
    """Enter ``torch.inference_mode()``; leaving happens when the returned guard is dropped.

    The C++ RAII guard costs a third of the context manager, which matters on
    a path taken once per inference call.
    """
    make = getattr(torch._C, "_InferenceMode", None)
    if make is not None:
        return make(True)
    mode = torch.inference_mode()  # pragma: no cover - builds without the private guard
    mode.__enter__()
    return _ExitOnDrop(mode)


class _ExitOnDrop:  # pragma: no cover - fallback for the above
    __slots__ = ("_mode",)

    def __init__(self, mode: Any) -> None:
        self._mode = mode

    def __del__(self) -> None:
        self._mode.__exit__(None, None, None)


class Lease(Generic[T]):
    """One borrowing of the model; a context manager (sync and async).

    Args:
        model: The model borrowed.
        pool: The pool it is borrowed through, if any: the lease is refused
            (and nothing loads) once the model has left that pool.
    """

    __slots__ = ("_grad", "_model", "_pool", "_token")

    def __init__(self, model: Borrowable[T], pool: object = None) -> None:
        self._model = model
        self._pool = pool
        self._token = 0
        self._grad: Any = None

    def __enter__(self) -> T:
        obj, self._token = self._model._acquire(self._pool)
        if self._model.inference_mode:
            self._grad = inference_guard()
        return obj

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._grad = None  # dropping the guard leaves inference mode
        self._model._return(self._token)

    async def __aenter__(self) -> T:
        # A load can take seconds: it runs off the event loop, in a worker
        # thread that takes no lease; the lease itself is taken here, in the
        # loop's thread and owned by this task. So a task cancelled while the
        # model loads leaves no lease behind (the load finishes for the next
        # user), and the lease is never mistaken for one of the worker thread's.
        # Grad mode is thread-local and would leak into other tasks across an
        # await, so async leases do not enter inference mode.
        model = self._model
        task = asyncio.current_task()
        while True:
            granted = model._try_acquire(task, self._pool)
            if granted is not None:
                obj, self._token = granted
                return obj
            await asyncio.to_thread(model._ensure_ready, self._pool)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._model._return(self._token)


class InferenceFunction(Generic[R]):
    """What ``@mm.inference`` returns: a callable (and descriptor, for methods) taking a lease."""

    def __init__(
        self,
        model: Borrowable[Any],
        function: Callable[..., R],
        inference_mode: bool | None,
        cleanup_policy: CleanupPolicy | None,
    ) -> None:
        self._model = model
        self._function = function
        self._mode = (
            model.inference_mode
            if inference_mode is None
            else check_flag(inference_mode, "inference_mode")
        )
        self._tracker = cleanup_policy.tracker(model.device) if cleanup_policy is not None else None
        self._is_async = inspect.iscoroutinefunction(function)
        functools.update_wrapper(self, function)

    @property
    def model(self) -> Borrowable[Any]:
        """The model each call borrows."""
        return self._model

    def _after(self) -> None:
        tracker = self._tracker or self._model._cleanup_tracker()
        if tracker is not None:
            tracker.after_call()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._is_async:
            return self._call_async(None, args, kwargs)
        return self._call(None, args, kwargs)

    def _call(self, instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]) -> R:
        model = self._model
        obj, token = model._acquire()
        try:
            guard = inference_guard() if self._mode else None
            try:
                result = self._invoke(instance, obj, args, kwargs)
            finally:
                del guard  # leaves inference mode
        finally:
            obj = None
            model._return(token)
        self._after()
        return cast("R", result)

    async def _call_async(
        self, instance: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        async with Lease(self._model) as obj:
            result = await cast("Awaitable[Any]", self._invoke(instance, obj, args, kwargs))
        self._after()
        return result

    def _invoke(
        self, instance: object, obj: object, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        if instance is None:
            return self._function(obj, *args, **kwargs)
        return self._function(instance, obj, *args, **kwargs)

    def __get__(self, instance: object, owner: type | None = None) -> Any:
        if instance is None:
            return self
        if self._is_async:
            return functools.partial(self._call_async_bound, instance)
        return functools.partial(self._call_bound, instance)

    def _call_bound(self, instance: object, *args: Any, **kwargs: Any) -> R:
        return self._call(instance, args, kwargs)

    def _call_async_bound(self, instance: object, *args: Any, **kwargs: Any) -> Any:
        return self._call_async(instance, args, kwargs)

    def __repr__(self) -> str:
        return f"<inference function {self._function.__qualname__} on {self._model.name!r}>"
