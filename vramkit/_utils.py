"""Small helpers several layers share: callables' names, coroutine checks, frames, wrappers.

Nothing here imports the rest of vramkit, so every module may use it.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import traceback
from collections.abc import Callable, Coroutine
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, cast

__all__ = [
    "callable_name",
    "clear_frames",
    "is_coroutine_callable",
    "qualname",
    "user_cache_dir",
    "wrap_calls",
]

S = TypeVar("S")


def callable_name(fn: object) -> str:
    """A short name for what ``fn`` builds: its ``__name__`` (``"model"`` for a lambda)."""
    name = getattr(fn, "__name__", None) or type(fn).__name__
    return "model" if name == "<lambda>" else name


def qualname(function: Callable[..., Any]) -> str:
    """``function``'s qualified name, for messages (its ``__name__`` or repr otherwise)."""
    return str(getattr(function, "__qualname__", None) or getattr(function, "__name__", function))


def is_coroutine_callable(function: object) -> bool:
    """Whether calling ``function`` returns a coroutine (functions, partials, callable objects)."""
    if inspect.isclass(function):
        return False
    if inspect.iscoroutinefunction(function):
        return True
    return inspect.iscoroutinefunction(getattr(function, "__call__", None))  # noqa: B004


def clear_frames(tb: TracebackType | None) -> None:
    """Drop the locals of the finished frames in ``tb`` (what a failed call built)."""
    with contextlib.suppress(RuntimeError):  # a frame still executing is not ours to clear
        traceback.clear_frames(tb)


def wrap_calls(
    function: Callable[..., Any],
    call: Callable[..., Any],
    *,
    start: Callable[[], S],
    failed: Callable[[S, BaseException], object],
    succeeded: Callable[[S], object],
) -> Any:
    """Wrap ``call`` with hooks around every call, async when ``function`` is a coroutine function.

    ``start()`` runs before each call and its result goes to ``failed(state,
    exc)`` (then the exception propagates) or to ``succeeded(state)`` (then
    the result is returned). The wrapper carries ``function``'s name and
    docstring (``functools.wraps``); ``call`` is what runs, ``function`` itself
    or a wrapper of it.
    """
    if is_coroutine_callable(function):
        coroutine_function = cast("Callable[..., Coroutine[Any, Any, Any]]", call)

        @functools.wraps(function)
        async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
            state = start()
            try:
                result = await coroutine_function(*args, **kwargs)
            except BaseException as exc:
                failed(state, exc)
                raise
            succeeded(state)
            return result

        return async_wrapper

    @functools.wraps(function)
    def sync_wrapper(*args: Any, **kwargs: Any) -> Any:
        state = start()
        try:
            result = call(*args, **kwargs)
        except BaseException as exc:
            failed(state, exc)
            raise
        succeeded(state)
        return result

    return sync_wrapper


def user_cache_dir() -> Path:
    """The user cache folder for vramkit: ``$XDG_CACHE_HOME/vramkit`` or ``~/.cache/vramkit``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vramkit"
