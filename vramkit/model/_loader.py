"""The loader contract: each call builds a new object that vramkit may free.

vramkit frees what it unloads, so it must be the only owner of what the
loader returns. A loader that hands back something else fails at load with
an error saying what is wrong and what to do, instead of becoming a 0-byte
``READY`` model or having its caller's weights destroyed by the first unload:

- ``None``, a generator or a coroutine (a ``yield`` or ``async`` by mistake);
- a model whose weights are all on ``meta`` (built under ``init_empty_weights``
  or ``torch.device("meta")`` and never loaded);
- an object the loader closes over (``lambda: prebuilt``) or reads from a
  module global, or the very object it returned before (a cache such as
  ``functools.lru_cache``): the caller keeps it, so ``owns=False`` is the way
  to share it.
"""

from __future__ import annotations

import functools
import inspect
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

from vramkit.adapters import Adapter
from vramkit.errors import InvalidArgumentError, ModelStateError

__all__ = ["check_loaded", "remember"]


def remember(obj: object) -> weakref.ref[Any] | None:
    """A weak reference to what a load returned, to know it if a loader returns it again."""
    try:
        return weakref.ref(obj)
    except TypeError:  # objects without weak references cannot be told apart later
        return None


def check_loaded(
    name: str,
    loader: Callable[[], object],
    obj: object,
    adapter: Adapter,
    size: int | None,
    last: weakref.ref[Any] | None,
    owns: bool,
) -> None:
    """Refuse what a loader must not return (see the module docstring).

    Args:
        name: The model's name, for the message.
        loader: The loader that returned ``obj``.
        obj: What it returned.
        adapter: The adapter found for ``obj``.
        size: ``obj``'s size per its adapter.
        last: The object of the previous load, weakly (``None`` before the first).
        owns: ``False`` when the caller keeps ``obj`` on purpose.

    Raises:
        InvalidArgumentError: ``obj`` is not a model vramkit can manage.
        ModelStateError: The loader returned the object vramkit unloaded.
    """
    if obj is None:
        raise InvalidArgumentError(f"{name}: the loader returned None; it must return the model")
    if inspect.isgenerator(obj) or inspect.isasyncgen(obj) or inspect.iscoroutine(obj):
        if inspect.iscoroutine(obj):
            obj.close()  # never awaited: closing it avoids a RuntimeWarning
        raise InvalidArgumentError(
            f"{name}: the loader returned a {type(obj).__name__}, not a model "
            "(a `yield` or `async def` where a plain function returning the model was meant?)"
        )
    if not size and _all_on_meta(adapter, obj):
        raise InvalidArgumentError(
            f"{name}: the loader returned a model whose weights are all on the meta device "
            "(built under init_empty_weights() or torch.device('meta') and never loaded); "
            "load the weights in the loader (load_state_dict(..., assign=True), "
            "accelerate's load_checkpoint_and_dispatch, from_pretrained)"
        )
    if not owns:
        return
    if last is not None and last() is obj:
        raise ModelStateError(
            f"{name}: the loader returned the object vramkit unloaded before (its memory was "
            "freed); a loader must build a new object at each call, so drop the cache that "
            "keeps it (functools.lru_cache, a global), or pass owns=False to keep the object yours"
        )
    where = _kept_by(loader, obj)
    if where is not None:
        raise InvalidArgumentError(
            f"{name}: the loader returns {where}, an object that exists outside it, so an "
            "unload could not free it and would break your copy; build the model inside the "
            "loader, or pass owns=False to keep the object yours"
        )


def _all_on_meta(adapter: Adapter, obj: object) -> bool:
    tensors = adapter.tensors(obj)
    with torch._C.DisableTorchFunctionSubclass():
        return bool(tensors) and all(t.is_meta for t in tensors)


def _kept_by(fn: object, obj: object, depth: int = 3) -> str | None:
    """How ``fn`` reaches ``obj`` without building it (a closure variable, a global...)."""
    if depth == 0:
        return None
    kind = type(fn)
    if kind is functools.partial:
        for value in (fn.func, *fn.args, *fn.keywords.values()):  # type: ignore[attr-defined]
            if value is obj:
                return "an argument bound with functools.partial"
        return _kept_by(fn.func, obj, depth - 1)  # type: ignore[attr-defined]
    if kind is types.MethodType:
        if fn.__self__ is obj:  # type: ignore[attr-defined]
            return "the object its method is bound to"
        return _kept_by(fn.__func__, obj, depth - 1)  # type: ignore[attr-defined]
    if kind is not types.FunctionType:
        return None
    function: types.FunctionType = fn  # type: ignore[assignment]
    cells = function.__closure__ or ()
    for variable, cell in zip(function.__code__.co_freevars, cells, strict=False):
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        if value is obj:
            return f"{variable!r} (a variable it closes over)"
        found = _kept_by(value, obj, depth - 1)
        if found is not None:
            return found
    namespace = function.__globals__
    for variable in function.__code__.co_names:
        if variable in namespace and namespace[variable] is obj:
            return f"{variable!r} (a global of {namespace.get('__name__', '?')})"
    if any(value is obj for value in function.__defaults__ or ()):
        return "a default argument"
    return None
