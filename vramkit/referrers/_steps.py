"""How a holder refers to its child, as steps of a chain; and which holders are roots.

One function per kind of holder (dict, class, list, cell, function, method,
frame, generator, exception, plain object), all reading by identity only.
"""

from __future__ import annotations

import functools
import types
from typing import Any, Protocol

from vramkit.referrers._chain import _Token
from vramkit.referrers._read import (
    _attribute_names,
    _class_namespace,
    _instance_dict,
    _key_text,
    _locals,
    _name,
    _qualified,
    _where,
)

_EXCEPTION_FIELDS: dict[str, Any] = {
    name: vars(BaseException)[name]
    for name in ("__traceback__", "__context__", "__cause__", "args")
}
_SUSPENDABLE = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


class _Scope(Protocol):
    """What the steps need of the search: the roots it recognises."""

    module_dicts: dict[int, str]  # id(module.__dict__) -> module name
    other_threads: dict[int, str]  # id(frame) -> name of the thread running it


def _edges(search: _Scope, holder: Any, child: Any) -> list[tuple[tuple[_Token, ...], str | None]]:
    """How ``holder`` refers to ``child``: steps, and the root kind when ``holder`` is a root."""
    kind = type(holder)
    if kind is dict or issubclass(kind, dict):
        module = search.module_dicts.get(id(holder))
        keys = _keys_holding(holder, child)
        if module is not None:
            return [((("module", module, ""), key), "module global") for key in keys]
        attributes = [] if kind is dict else _attribute_names(holder, child)
        if attributes:
            return [((("attr", _name(kind), attributes[0]),), None)]
        return [((key,), None) for key in keys or [("text", "(a key)", "")]]
    if issubclass(kind, type):
        if child is _class_namespace(holder):
            return [((("class", _qualified(holder), ""),), "class attribute")]
        return [((("text", f"class {_qualified(holder)}", ""),), None)]
    if kind is list or kind is tuple or issubclass(kind, list | tuple):
        items = list.__iter__(holder) if issubclass(kind, list) else tuple.__iter__(holder)
        found = [i for i, item in enumerate(items) if item is child][:3]
        return [((("index", str(i), ""),), None) for i in found]
    if issubclass(kind, set | frozenset):
        return [((("set", "", ""),), None)]
    if kind is types.CellType:
        return [((("cell", "", ""),), None)]
    if kind is types.FunctionType:
        return [(tokens, None) for tokens in _function_edges(holder, child)]
    if kind is types.MethodType:
        role = "bound method" if holder.__self__ is child else "method"
        return [((("text", f"{role} {_function_name(holder.__func__)}", ""),), None)]
    if kind is types.FrameType:
        return _frame_edges(search, holder, child)
    if kind is types.TracebackType:
        return [((("text", "traceback", ""),), None)]
    if kind in _SUSPENDABLE:
        return [(tokens, None) for tokens in _suspended_edges(holder, child)]
    if kind is functools._lru_cache_wrapper:
        return [((("text", "lru_cache", ""),), None)]  # its cache dict, by argument tuple
    if issubclass(kind, BaseException):
        for name, getter in _EXCEPTION_FIELDS.items():
            if getter.__get__(holder, kind) is child:
                return [((("attr", _name(kind), name),), None)]
    if child is _instance_dict(holder):
        return [((("attr", _name(kind), "__dict__"),), None)]
    names = _attribute_names(holder, child)
    if names:
        return [((("attr", _name(kind), names[0]),), None)]
    return [((("text", _name(kind), ""),), None)]


def _keys_holding(mapping: Any, child: object) -> list[_Token]:
    """The entries of ``mapping`` whose value (or key) is ``child``, read by identity."""
    found: list[_Token] = []
    for key, value in dict.items(mapping):
        if value is child:
            found.append(("key", _key_text(key), key if type(key) is str else ""))
        elif key is child:
            found.append(("text", "(a key)", ""))
        if len(found) >= 3:
            break
    return found


def _function_edges(function: types.FunctionType, child: object) -> list[tuple[_Token, ...]]:
    name = _function_name(function)
    if function.__closure__ is child:
        return [(("closure", name, " ".join(function.__code__.co_freevars)),)]
    if function.__defaults__ is child or function.__kwdefaults__ is child:
        return [(("text", f"defaults of {name}", ""),)]
    names = _attribute_names(function, child)
    if names:
        return [(("text", f"function {name}.{names[0]}", ""),)]
    return [(("text", f"function {name}", ""),)]


def _function_name(function: object) -> str:
    if type(function) is types.FunctionType:
        return str(function.__qualname__)
    return _name(type(function))


def _frame_edges(
    search: _Scope, frame: types.FrameType, child: object
) -> list[tuple[tuple[_Token, ...], str | None]]:
    thread = search.other_threads.get(id(frame))
    if thread is not None:
        # Another thread's running frame: name it, never read its locals (that
        # can crash CPython 3.11 while the thread runs).
        text = f"{_where(frame)}, a local of running thread {thread!r}"
        return [((("text", text, ""),), "frame")]
    names = [n for n, v in _locals(frame) if v is child][:3] or ["?"]
    return [((("text", f"{_where(frame)} (finished), local {n}", ""),), None) for n in names]


def _suspended_code(generator: Any) -> types.CodeType:
    if type(generator) is types.CoroutineType:
        return generator.cr_code
    if type(generator) is types.AsyncGeneratorType:
        return generator.ag_code
    return generator.gi_code  # type: ignore[no-any-return]


def _suspended_edges(generator: Any, child: object) -> list[tuple[_Token, ...]]:
    kind = type(generator)
    label = f"{_name(kind)} {_suspended_code(generator).co_name}"
    if kind is types.CoroutineType:
        frame = generator.cr_frame
    elif kind is types.AsyncGeneratorType:
        frame = generator.ag_frame
    else:
        frame = generator.gi_frame
    names = [] if frame is None else [n for n, v in _locals(frame) if v is child]
    if not names:
        return [(("text", label, ""),)]
    return [(("text", f"{label} (suspended), local {n}", ""),) for n in names[:3]]
