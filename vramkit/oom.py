"""Recognise out-of-memory errors from every backend, and recover from them.

>>> from vramkit.oom import is_oom_error
>>> is_oom_error(MemoryError())
True

- :func:`is_oom_error` knows torch's ``OutOfMemoryError`` (CUDA, XPU), the
  messages of the MPS backend and of torch's CPU allocator
  (``DefaultCPUAllocator: can't allocate memory``), cuDNN and cuBLAS
  allocation failures, and ONNX Runtime's arena failures (``Failed to
  allocate memory for requested buffer``, ``bad allocation``), recognised by
  type name and message so that onnxruntime is never imported to check.
- :func:`oom_retry` retries a call after dropping the failed attempt's
  references, evicting idle models and cleaning up.
- :func:`adaptive_batch_size` retries with a smaller batch and remembers the
  size that fits, like accelerate's ``find_executable_batch_size``.
- :class:`OomRetry` is the one retry loop both use, and ``ModelPool.call`` too:
  each says only whether to try again and how to free memory first.

Both translate a failure that survives recovery into
:class:`vramkit.errors.OutOfMemoryError` with ``raise ... from`` the original.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, Protocol, TypeVar, cast, overload, runtime_checkable

from vramkit._oomerrors import drop_frames, is_oom_error
from vramkit._utils import is_coroutine_callable, qualname
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError, OutOfMemoryError

__all__ = [
    "AdaptiveBatchFunction",
    "OomRetry",
    "SupportsEvictIdle",
    "adaptive_batch_size",
    "drop_frames",
    "is_oom_error",
    "oom_retry",
]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


@runtime_checkable
class SupportsEvictIdle(Protocol):
    """Anything that can free memory held by idle models, such as a ``ModelPool``."""

    def evict_idle(self) -> object:
        """Offload or unload the models not in use."""
        ...


def _resolve_optional(device: DeviceLike | None) -> Device | None:
    # None stays None: clean every available device, since an OOM on one
    # device often follows memory held on the host or another device.
    return None if device is None else resolve_device(device)


def _gave_up(name: str, attempts: int, exc: BaseException) -> OutOfMemoryError:
    how = (
        "1 attempt, no retry"
        if attempts == 1
        else f"{attempts} attempts, with cleanup between them"
    )
    return OutOfMemoryError(
        f"{name} ran out of memory ({how}); last error: {type(exc).__name__}: {exc}"
    )


class OomRetry:
    """The one out-of-memory retry loop; subclasses say when to try again and how to make room.

    :func:`oom_retry`, :func:`adaptive_batch_size` and ``ModelPool.call`` are
    three such subclasses. :meth:`run` calls ``call(attempt)`` (1 for the first attempt) until it
    returns. On an error :func:`is_oom_error` recognises, the failed attempt's
    frames are cleared (:func:`drop_frames`), then :meth:`again` decides: no
    gives up (:meth:`gave_up`, raised ``from`` the error, or the error itself
    when ``translate`` is false); yes runs :meth:`recover` once the
    interpreter has let go of the failed attempt, and calls again. Other
    errors pass through untouched. :meth:`run_async` does the same for a
    coroutine. The loop keeps no state of its own between calls: what one
    call learns (a batch size) belongs in a fresh instance per call.

    Args:
        name: What is retried, for the error that gives up.
        translate: Give up with :class:`~vramkit.errors.OutOfMemoryError`
            (``True``) or re-raise the last error as it is.

    Example:
        >>> class Twice(OomRetry):
        ...     def again(self, exc: BaseException, attempt: int) -> bool:
        ...         return attempt < 2
        >>> seen = []
        >>> def attempt(n: int) -> str:
        ...     seen.append(n)
        ...     if n == 1:
        ...         raise MemoryError("out of memory")
        ...     return "fits"
        >>> Twice("embed").run(attempt), seen
        ('fits', [1, 2])
    """

    __slots__ = ("name", "translate")

    def __init__(self, name: str, *, translate: bool = True) -> None:
        self.name = name
        self.translate = translate

    def again(self, exc: BaseException, attempt: int) -> bool:
        """Whether to try again after attempt number ``attempt`` ran out of memory (default: no)."""
        return False

    def recover(self, exc: BaseException, attempt: int) -> None:
        """Free memory before the next attempt (default: nothing)."""

    def gave_up(self, exc: BaseException, attempt: int) -> BaseException:
        """The error raised ``from exc`` when :meth:`again` says no and ``translate`` is set."""
        return _gave_up(self.name, attempt, exc)

    def _retrying(self, exc: Exception, attempt: int) -> bool:
        """Whether to call again after ``exc`` (``False``: re-raise it as it is).

        Raises:
            OutOfMemoryError: From :meth:`gave_up`, when giving up translates.
        """
        if not is_oom_error(exc):
            return False
        drop_frames(exc)
        if self.again(exc, attempt):
            return True
        if self.translate:
            raise self.gave_up(exc, attempt) from exc
        return False

    def run(self, call: Callable[[int], R]) -> R:
        """Call ``call(attempt)`` until it returns, making room between out-of-memory errors."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return call(attempt)
            except Exception as exc:
                if not self._retrying(exc, attempt):
                    raise
                failure: BaseException | None = exc
            # Out of the except block: the interpreter's reference to the
            # exception being handled is gone before recovery runs.
            assert failure is not None
            self.recover(failure, attempt)
            failure = None

    async def run_async(self, call: Callable[[int], Awaitable[R]]) -> R:
        """:meth:`run` for a coroutine: await ``call(attempt)`` until it returns."""
        attempt = 0
        while True:
            attempt += 1
            try:
                return await call(attempt)
            except Exception as exc:
                if not self._retrying(exc, attempt):
                    raise
                failure: BaseException | None = exc
            assert failure is not None
            self.recover(failure, attempt)
            failure = None


class _Retries(OomRetry):
    """What :func:`oom_retry` does: up to ``allowed`` retries, each after freeing memory."""

    __slots__ = ("allowed", "device", "on_oom", "pool")

    def __init__(
        self,
        name: str,
        allowed: int,
        on_oom: Callable[[BaseException, int], object] | None,
        pool: SupportsEvictIdle | None,
        device: Device | None,
    ) -> None:
        super().__init__(name)
        self.allowed = allowed
        self.on_oom = on_oom
        self.pool = pool
        self.device = device

    def again(self, exc: BaseException, attempt: int) -> bool:
        return attempt <= self.allowed

    def recover(self, exc: BaseException, attempt: int) -> None:
        # The callback and the pool free what they can first, so that the
        # cleanup after them returns that memory to the driver too.
        if self.on_oom is not None:
            self.on_oom(exc, attempt)
        if self.pool is not None:
            self.pool.evict_idle()
        cleanup(self.device)


@overload
def oom_retry(retries: Callable[P, R], /) -> Callable[P, R]: ...
@overload
def oom_retry(
    retries: int = 1,
    *,
    on_oom: Callable[[BaseException, int], object] | None = None,
    pool: SupportsEvictIdle | None = None,
    device: DeviceLike | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]: ...
def oom_retry(
    retries: int | Callable[..., Any] = 1,
    *,
    on_oom: Callable[[BaseException, int], object] | None = None,
    pool: SupportsEvictIdle | None = None,
    device: DeviceLike | None = None,
) -> Callable[..., Any]:
    """Retry a call that ran out of memory, after freeing what can be freed.

    On an error :func:`is_oom_error` recognises, the failed attempt's frames
    are cleared (its traceback would otherwise keep its tensors alive), then
    ``on_oom(exc, attempt)`` runs, then ``pool.evict_idle()``, then
    :func:`vramkit.cleanup`, and the call is made again. Other errors pass
    through untouched. Use bare (``@oom_retry``, one retry) or with arguments;
    coroutine functions get an async wrapper.

    Args:
        retries: How many times to retry (0: translate the error only).
        on_oom: Called with the error and the failed attempt's number (1 for the first).
        pool: Anything with ``evict_idle()``, such as a ``ModelPool``.
        device: The device to clean (``None``: every available device).

    Returns:
        A decorator (or, bare, the wrapped function).

    Raises:
        InvalidArgumentError: A setting of the wrong type or value.
        OutOfMemoryError: From the wrapped call, when the last retry still ran
            out of memory; the original error is its ``__cause__``.

    Example:
        >>> @oom_retry(2, device="cpu")
        ... def embed(n: int) -> int:
        ...     return n * 2
        >>> embed(4)
        8
    """
    if callable(retries) and not isinstance(retries, int):
        return oom_retry(1, on_oom=on_oom, pool=pool, device=device)(retries)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise InvalidArgumentError(
            f"retries must be a whole number of retries, 0 or more; got {retries!r}"
        )
    if on_oom is not None and not callable(on_oom):
        raise InvalidArgumentError(
            f"on_oom must be a callable taking (exception, attempt), or None; got {on_oom!r}"
        )
    if pool is not None and not callable(getattr(pool, "evict_idle", None)):
        raise InvalidArgumentError(
            f"pool must have an evict_idle() method (a ModelPool), or be None; got {pool!r}"
        )
    target = _resolve_optional(device)

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        if not callable(function) or inspect.isclass(function):
            raise InvalidArgumentError(f"oom_retry decorates a function; got {function!r}")
        loop = _Retries(qualname(function), retries, on_oom, pool, target)
        if is_coroutine_callable(function):
            coroutine_function = cast("Callable[..., Coroutine[Any, Any, Any]]", function)

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                return await loop.run_async(lambda _: coroutine_function(*args, **kwargs))

            return cast("Callable[P, R]", async_wrapper)

        @functools.wraps(function)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            return loop.run(lambda _: function(*args, **kwargs))

        return cast("Callable[P, R]", sync_wrapper)

    return decorate


class AdaptiveBatchFunction(Protocol[P, R_co]):
    """A function wrapped by :func:`adaptive_batch_size`."""

    batch_size: int
    """The size the next call starts at: the start, or the last size backed off to."""

    def reset(self) -> None:
        """Forget what was learned: the next call starts at ``start`` again."""
        ...

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call the function with the batch size filled in."""
        ...


def _check_size(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgumentError(f"{what} must be a whole number, 1 or more; got {value!r}")
    return value


class _BatchState:
    """The remembered batch size of one decorated function, shared by all its callers."""

    __slots__ = ("_lock", "_wrapper", "size", "start")

    def __init__(self, start: int) -> None:
        self.start = start
        self.size = start
        self._lock = threading.Lock()
        self._wrapper: Any = None

    def attach(self, wrapper: Any) -> None:
        self._wrapper = wrapper
        wrapper.batch_size = self.size
        wrapper.reset = self.reset

    def lower(self, size: int) -> None:
        with self._lock:
            if size < self.size:
                self.size = size
                self._wrapper.batch_size = size

    def reset(self) -> None:
        with self._lock:
            self.size = self.start
            self._wrapper.batch_size = self.start


class _Backoff(OomRetry):
    """One call of an :func:`adaptive_batch_size` function: smaller after each failure."""

    __slots__ = ("following", "param", "size", "smaller", "state", "target")

    def __init__(
        self,
        name: str,
        param: str,
        size: int,
        smaller: Callable[[int], int | None],
        state: _BatchState,
        target: Device | None,
    ) -> None:
        super().__init__(name)
        self.param = param
        self.size = size
        self.smaller = smaller
        self.state = state
        self.target = target
        self.following: int | None = None

    def again(self, exc: BaseException, attempt: int) -> bool:
        self.following = self.smaller(self.size)
        return self.following is not None

    def gave_up(self, exc: BaseException, attempt: int) -> BaseException:
        return _gave_up(f"{self.name} ({self.param}={self.size})", attempt, exc)

    def recover(self, exc: BaseException, attempt: int) -> None:
        assert self.following is not None  # again() said yes
        self.state.lower(self.following)
        cleanup(self.target)
        self.size = self.following


class _Placement:
    """Where the batch size goes in a call: a keyword, or a positional slot when passed so."""

    __slots__ = ("param", "position")

    def __init__(self, function: Callable[..., Any], param: str) -> None:
        self.param = param
        self.position: int | None = None
        try:
            parameters = inspect.signature(function).parameters
        except (TypeError, ValueError):
            return  # no signature to check (some builtins): pass it by keyword
        found = parameters.get(param)
        if found is None:
            if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
                raise InvalidArgumentError(
                    f"{qualname(function)} has no parameter {param!r} to receive the batch "
                    f"size; add one (it may have a default) or pass param='...'"
                )
            return
        if found.kind is inspect.Parameter.POSITIONAL_ONLY:
            raise InvalidArgumentError(
                f"{qualname(function)}'s {param!r} is positional-only; the batch size is "
                "passed by keyword"
            )
        if found.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD:
            self.position = list(parameters).index(param)

    def given(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        if self.position is not None and len(args) > self.position:
            return _check_size(args[self.position], self.param)
        if self.param in kwargs:
            return _check_size(kwargs[self.param], self.param)
        return None

    def fill(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], size: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if self.position is not None and len(args) > self.position:
            return (*args[: self.position], size, *args[self.position + 1 :]), kwargs
        return args, {**kwargs, self.param: size}


def adaptive_batch_size(
    start: int,
    *,
    backoff: float = 0.5,
    minimum: int = 1,
    param: str = "batch_size",
    device: DeviceLike | None = None,
) -> Callable[[Callable[P, R]], AdaptiveBatchFunction[P, R]]:
    """Call with the largest batch that fits, backing off on out-of-memory errors.

    The wrapped function receives the batch size as keyword ``param``; callers
    may leave it out (or pass one to start this call from). On an
    out-of-memory error the failed attempt's frames are cleared, memory is
    cleaned up and the call is made again with ``floor(size * backoff)`` (never
    below ``minimum``). The size backed off to is remembered for later calls
    from any thread (``.batch_size``) until ``.reset()``; it never grows back
    by itself. Coroutine functions get an async wrapper.

    Args:
        start: The first size to try.
        backoff: Factor applied after each failure, between 0 and 1.
        minimum: The smallest size to try; failing there raises.
        param: The keyword receiving the size, such as FunASR's ``"batch_size_s"``.
        device: The device to clean between attempts (``None``: every available device).

    Returns:
        A decorator; the wrapped function has ``batch_size`` and ``reset()``.

    Raises:
        InvalidArgumentError: A setting of the wrong type or value, or a
            function without a ``param`` parameter.
        OutOfMemoryError: From the wrapped call, when even ``minimum`` ran out of memory.

    Example:
        >>> @adaptive_batch_size(64, param="batch_size_s")
        ... def transcribe(files: list[str], *, batch_size_s: int) -> int:
        ...     return batch_size_s
        >>> transcribe(["a.wav"])
        64
    """
    if callable(start) and not isinstance(start, int):
        raise InvalidArgumentError(
            "adaptive_batch_size needs the size to start from: write @adaptive_batch_size(16)"
        )
    _check_size(start, "start")
    if (
        isinstance(backoff, bool)
        or not isinstance(backoff, int | float)
        or not math.isfinite(backoff)
        or not 0 < backoff < 1
    ):
        raise InvalidArgumentError(
            f"backoff must be a factor between 0 and 1 (0.5 halves the batch); got {backoff!r}"
        )
    _check_size(minimum, "minimum")
    if minimum > start:
        raise InvalidArgumentError(f"minimum ({minimum}) must not exceed start ({start})")
    if not isinstance(param, str) or not param.isidentifier():
        raise InvalidArgumentError(f"param must be a parameter name; got {param!r}")
    target = _resolve_optional(device)

    def smaller(size: int) -> int | None:
        if size <= minimum:
            return None
        return max(minimum, min(size - 1, math.floor(size * backoff)))

    def decorate(function: Callable[P, R]) -> AdaptiveBatchFunction[P, R]:
        if not callable(function) or inspect.isclass(function):
            raise InvalidArgumentError(
                f"adaptive_batch_size decorates a function; got {function!r}"
            )
        placement = _Placement(function, param)
        state = _BatchState(start)
        name = qualname(function)

        def backoff(args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Backoff:
            size = placement.given(args, kwargs) or state.size
            return _Backoff(name, param, size, smaller, state, target)

        def filled(
            loop: _Backoff, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> tuple[tuple[Any, ...], dict[str, Any]]:
            return placement.fill(args, kwargs, loop.size)

        wrapper: Any
        if is_coroutine_callable(function):
            coroutine_function = cast("Callable[..., Coroutine[Any, Any, Any]]", function)

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                loop = backoff(args, kwargs)

                def attempt(_: int) -> Coroutine[Any, Any, Any]:
                    call_args, call_kwargs = filled(loop, args, kwargs)
                    return coroutine_function(*call_args, **call_kwargs)

                return await loop.run_async(attempt)

            wrapper = async_wrapper
        else:

            @functools.wraps(function)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                loop = backoff(args, kwargs)

                def attempt(_: int) -> Any:
                    call_args, call_kwargs = filled(loop, args, kwargs)
                    return function(*call_args, **call_kwargs)

                return loop.run(attempt)

            wrapper = sync_wrapper
        state.attach(wrapper)
        return cast("AdaptiveBatchFunction[P, R]", wrapper)

    return decorate
