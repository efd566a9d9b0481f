"""When to clean up: a policy, not a reflex, and :func:`managed` to apply one to a function.

Each ``empty_cache`` throws away blocks the caching allocator would have
reused, so cleaning after every tensor makes inference slower for nothing.
A :class:`CleanupPolicy` says when cleanup is worth it: every N calls (a call
being one batch), every so many seconds, or when the device is nearly full.
A :class:`CleanupTracker` applies it to one device (both live in
:mod:`vramkit.cleaning`, beside the cleanup they schedule, so that a model can
take a policy), and :func:`managed` applies it to a plain inference function:

>>> from vramkit.policy import CleanupPolicy, managed
>>> @managed("cpu", cleanup=CleanupPolicy(every_calls=100))
... def predict(x: int) -> int:
...     return x + 1
>>> predict(1)
2
>>> predict.tracker.calls
1
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast, overload

from vramkit._utils import wrap_calls
from vramkit.cleaning import CleanupPolicy, CleanupReason, CleanupTracker
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError
from vramkit.oom import oom_retry
from vramkit.session import GpuSession

__all__ = ["CleanupPolicy", "CleanupReason", "CleanupTracker", "ManagedFunction", "managed"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_log = logging.getLogger("vramkit")


class ManagedFunction(Protocol[P, R_co]):
    """A function wrapped by :func:`managed`: call it as before."""

    tracker: CleanupTracker
    """The cleanup counters shared by every call of this function."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Call the function, then let the tracker decide on cleanup."""
        ...


_PER_CALL: Final = CleanupPolicy.per_call()


@overload
def managed(device: Callable[P, R], /) -> ManagedFunction[P, R]: ...
@overload
def managed(
    device: DeviceLike | None = None,
    *,
    cleanup: CleanupPolicy | None = _PER_CALL,
    oom_retries: int = 0,
    session: GpuSession | None = None,
) -> Callable[[Callable[P, R]], ManagedFunction[P, R]]: ...
def managed(
    device: DeviceLike | Callable[..., Any] | None = None,
    *,
    cleanup: CleanupPolicy | None = _PER_CALL,
    oom_retries: int = 0,
    session: GpuSession | None = None,
) -> ManagedFunction[..., Any] | Callable[[Callable[P, R]], ManagedFunction[P, R]]:
    """Give a plain inference function a cleanup cadence, OOM recovery and a leak check.

    For functions that hold no :class:`ManagedModel` (a model kept elsewhere,
    or a FunASR ``AutoModel`` built once). Each call runs, in order: inside
    ``session`` when given; the function, retried after an out-of-memory error
    ``oom_retries`` times (see :func:`vramkit.oom_retry`); then the policy's
    tracker, which cleans up when a rule fires. Coroutine functions get an
    async wrapper. Use bare (``@managed``) or with arguments.

    Args:
        device: The device to clean and read (``None``: the default device).
        cleanup: When to clean up; ``CleanupPolicy.per_call()`` by default
            (every call is one batch); ``None`` means never.
        oom_retries: Retries after an out-of-memory error (0: none).
        session: A :class:`GpuSession` to run each call in, such as
            ``gpu_session(leak_check="warn")``.

    Returns:
        A decorator, or with bare ``@managed`` the wrapped function, whose
        ``tracker`` attribute holds the counters.

    Raises:
        InvalidArgumentError: A setting of the wrong type or value.
    """
    if callable(device) and not isinstance(device, str | int | Device):
        return managed(None, cleanup=cleanup, oom_retries=oom_retries, session=session)(device)
    policy = CleanupPolicy.never() if cleanup is None else cleanup
    if not isinstance(policy, CleanupPolicy):
        raise InvalidArgumentError(f"cleanup must be a CleanupPolicy or None; got {cleanup!r}")
    if isinstance(oom_retries, bool) or not isinstance(oom_retries, int) or oom_retries < 0:
        raise InvalidArgumentError(
            f"oom_retries must be a whole number of retries, 0 or more; got {oom_retries!r}"
        )
    if session is not None and not isinstance(session, GpuSession):
        raise InvalidArgumentError(
            f"session must be a GpuSession (from vramkit.gpu_session(...)) or None; got {session!r}"
        )
    target = resolve_device(device)

    def decorate(function: Callable[P, R]) -> ManagedFunction[P, R]:
        if not callable(function) or inspect.isclass(function):
            raise InvalidArgumentError(f"managed decorates a function; got {function!r}")
        tracker = policy.tracker(target)
        call: Callable[..., Any] = function
        if oom_retries:
            call = oom_retry(oom_retries, device=target)(function)
        wrapper: Any = wrap_calls(
            function,
            call,
            start=lambda: None,
            failed=lambda _, __: _after_failure(tracker),
            succeeded=lambda _: tracker.after_call(),
        )
        if session is not None:
            # Outermost, so the leak check sees memory after the policy's cleanup.
            wrapper = session(wrapper)
        wrapper.tracker = tracker
        return cast("ManagedFunction[P, R]", wrapper)

    return decorate


def _after_failure(tracker: CleanupTracker) -> None:
    """Count a failed call too (it used memory), without hiding its exception."""
    try:
        tracker.after_call()
    except Exception:
        _log.warning("cleanup after a failed call failed", exc_info=True)
