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

Both translate a failure that survives recovery into
:class:`vramkit.errors.OutOfMemoryError` with ``raise ... from`` the original.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import traceback
from collections.abc import Callable, Coroutine
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast, overload, runtime_checkable

from vramkit._utils import is_coroutine_callable, qualname
from vramkit.cleaning import cleanup
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError, OutOfMemoryError

__all__ = [
    "AdaptiveBatchFunction",
    "SupportsEvictIdle",
    "adaptive_batch_size",
    "drop_frames",
    "is_oom_error",
    "oom_retry",
]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

# Lower-cased fragments that mean "an allocator could not allocate", whatever raised them:
# torch CUDA/HIP/XPU/MPS ("CUDA out of memory.", "MPS backend out of memory"), the CUDA
# runtime ("cudaErrorMemoryAllocation", "CUDA failure 2: out of memory" in ONNX Runtime),
# torch's CPU allocator, and cuDNN / cuBLAS running out of workspace.
_OOM_MESSAGES: Final = (
    "out of memory",
    "defaultcpuallocator: can't allocate memory",
    "cudaerrormemoryallocation",
    "cudnn_status_alloc_failed",
    "cublas_status_alloc_failed",
)
# ONNX Runtime's arena (BFCArena) and std::bad_alloc, as its Python exceptions word them:
# "BFCArena::AllocateRawInternal ... Failed to allocate memory for requested buffer of size N",
# "Available memory of 0 is smaller than requested bytes of N", "... failed:bad allocation".
_ORT_MESSAGES: Final = (
    "failed to allocate memory",
    "available memory of",
    "bad allocation",
    "bad_alloc",
)
_ORT_TYPES: Final = frozenset({"RuntimeException", "Fail", "EPFail"})
# cuDNN answers NOT_SUPPORTED both for unsupported configurations and for inputs too
# large for its workspace; only the second is worth a smaller batch.
_CUDNN_NOT_SUPPORTED: Final = "cudnn_status_not_supported"
_CHAIN_LIMIT: Final = 8


@functools.cache
def _oom_types() -> tuple[type[BaseException], ...]:
    """The exception types that always mean out of memory (torch imported on first use)."""
    import torch

    found: list[type[BaseException]] = [MemoryError]
    for owner in (torch, getattr(torch, "cuda", None)):
        kind = getattr(owner, "OutOfMemoryError", None)
        if isinstance(kind, type) and issubclass(kind, BaseException):
            found.append(kind)
    return tuple(found)


def _is_ort_error(exc: BaseException) -> bool:
    kind = type(exc)
    return kind.__module__.startswith("onnxruntime") and kind.__name__ in _ORT_TYPES


def _says_oom(exc: BaseException) -> bool:
    if isinstance(exc, _oom_types()):
        return True
    from_ort = _is_ort_error(exc)
    if not (from_ort or isinstance(exc, RuntimeError)):
        return False
    text = str(exc).lower()
    fragments = _OOM_MESSAGES + _ORT_MESSAGES if from_ort else _OOM_MESSAGES
    return any(fragment in text for fragment in fragments)


def is_oom_error(exc: BaseException) -> bool:
    """Whether ``exc`` means a device (or the host) ran out of memory.

    Recognised: :class:`MemoryError` (vramkit's
    :class:`~vramkit.errors.OutOfMemoryError` included), ``torch.OutOfMemoryError``
    / ``torch.cuda.OutOfMemoryError``, a ``RuntimeError`` whose message says
    ``out of memory`` (CUDA, HIP, XPU, MPS), ``DefaultCPUAllocator: can't
    allocate memory``, cuDNN or cuBLAS ``*_ALLOC_FAILED``, and ONNX Runtime's
    ``RuntimeException`` / ``Fail`` reporting an allocation failure. cuDNN's
    ``CUDNN_STATUS_NOT_SUPPORTED`` counts only when an out-of-memory error is in
    its chain, since alone it usually means an unsupported configuration. An
    error raised ``from`` an out-of-memory error (its ``__cause__``) counts too.

    Args:
        exc: The exception to classify.

    Returns:
        ``True`` for an out-of-memory error.

    Raises:
        InvalidArgumentError: When ``exc`` is not an exception.
    """
    if not isinstance(exc, BaseException):
        raise InvalidArgumentError(f"is_oom_error needs an exception instance; got {exc!r}")
    current: BaseException | None = exc
    for _ in range(_CHAIN_LIMIT):
        if current is None:
            break
        if _says_oom(current):
            return True
        current = current.__cause__
    if _CUDNN_NOT_SUPPORTED in str(exc).lower():
        context = exc.__cause__ or exc.__context__
        for _ in range(_CHAIN_LIMIT):
            if context is None:
                break
            if _says_oom(context):
                return True
            context = context.__cause__ or context.__context__
    return False


def drop_frames(exc: BaseException) -> None:
    """Clear the locals of the finished frames in ``exc``'s tracebacks (and its chain's).

    A traceback keeps every frame it passed through alive, and with them the
    failed call's locals: the activations that did not fit. Clearing them
    lets that memory go before a retry. Frames still running are left alone.
    """
    pending: list[BaseException] = [exc]
    seen: set[int] = set()
    while pending and len(seen) < _CHAIN_LIMIT:
        current = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current.__traceback__ is not None:
            traceback.clear_frames(current.__traceback__)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)


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


class _Recovery:
    """What :func:`oom_retry` does between attempts, shared by its sync and async wrappers."""

    __slots__ = ("device", "on_oom", "pool")

    def __init__(
        self,
        on_oom: Callable[[BaseException, int], object] | None,
        pool: SupportsEvictIdle | None,
        device: Device | None,
    ) -> None:
        self.on_oom = on_oom
        self.pool = pool
        self.device = device

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
    recovery = _Recovery(on_oom, pool, _resolve_optional(device))
    allowed = retries

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        if not callable(function) or inspect.isclass(function):
            raise InvalidArgumentError(f"oom_retry decorates a function; got {function!r}")
        name = qualname(function)
        if is_coroutine_callable(function):
            coroutine_function = cast("Callable[..., Coroutine[Any, Any, Any]]", function)

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                attempt = 0
                while True:
                    attempt += 1
                    try:
                        return await coroutine_function(*args, **kwargs)
                    except Exception as exc:
                        if not is_oom_error(exc):
                            raise
                        drop_frames(exc)
                        if attempt > allowed:
                            raise _gave_up(name, attempt, exc) from exc
                        failure: BaseException | None = exc
                    assert failure is not None
                    recovery.recover(failure, attempt)
                    failure = None

            return cast("Callable[P, R]", async_wrapper)

        @functools.wraps(function)
        def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
            attempt = 0
            while True:
                attempt += 1
                try:
                    return function(*args, **kwargs)
                except Exception as exc:
                    if not is_oom_error(exc):
                        raise
                    drop_frames(exc)
                    if attempt > allowed:
                        raise _gave_up(name, attempt, exc) from exc
                    failure: BaseException | None = exc
                # Out of the except block: the interpreter's reference to the
                # exception being handled is gone before the cleanup runs.
                assert failure is not None
                recovery.recover(failure, attempt)
                failure = None

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
        wrapper: Any
        if is_coroutine_callable(function):
            coroutine_function = cast("Callable[..., Coroutine[Any, Any, Any]]", function)

            @functools.wraps(function)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                size = placement.given(args, kwargs) or state.size
                attempts = 0
                while True:
                    attempts += 1
                    call_args, call_kwargs = placement.fill(args, kwargs, size)
                    try:
                        return await coroutine_function(*call_args, **call_kwargs)
                    except Exception as exc:
                        if not is_oom_error(exc):
                            raise
                        drop_frames(exc)
                        following = smaller(size)
                        if following is None:
                            raise _gave_up(f"{name} ({param}={size})", attempts, exc) from exc
                    del call_args, call_kwargs
                    state.lower(following)
                    cleanup(target)
                    size = following

            wrapper = async_wrapper
        else:

            @functools.wraps(function)
            def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
                size = placement.given(args, kwargs) or state.size
                attempts = 0
                while True:
                    attempts += 1
                    call_args, call_kwargs = placement.fill(args, kwargs, size)
                    try:
                        return function(*call_args, **call_kwargs)
                    except Exception as exc:
                        if not is_oom_error(exc):
                            raise
                        drop_frames(exc)
                        following = smaller(size)
                        if following is None:
                            raise _gave_up(f"{name} ({param}={size})", attempts, exc) from exc
                    del call_args, call_kwargs
                    state.lower(following)
                    cleanup(target)
                    size = following

            wrapper = sync_wrapper
        state.attach(wrapper)
        return cast("AdaptiveBatchFunction[P, R]", wrapper)

    return decorate
