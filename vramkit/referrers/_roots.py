"""The roots and indexes a search reads once: module globals, running frames, the module trees.

Read before the first scan: which dicts are a module's globals, this thread's
running locals (invisible to the gc since Python 3.11), the frames other threads
run, the exception being handled, and who owns each child of an ``nn.Module``.
"""

from __future__ import annotations

import gc
import sys
import threading
import types
from typing import Any

from vramkit._gc import tensors_in_heap
from vramkit.referrers._read import (
    _instance_dict,
    _is_vramkit,
    _items,
    _lookup,
    _module_dict,
    _name,
    _where,
)


def _module_dicts() -> dict[int, str]:
    """``id(module.__dict__) -> module name`` for every imported module."""
    found: dict[int, str] = {}
    for name, module in list(dict.items(sys.modules)):
        if type(name) is str and issubclass(type(module), types.ModuleType):
            try:
                namespace = _module_dict.__get__(module)
            except Exception:  # a half-initialised extension module
                continue
            if type(namespace) is dict:
                found.setdefault(id(namespace), name)
    return found


def _module_index(
    torch: Any, given: list[Any] | None
) -> tuple[dict[int, Any], dict[int, tuple[Any, str]]]:
    """The live ``nn.Module`` objects (``given``, or all), and who owns each child in their trees.

    Returns:
        The modules by id (kept alive so their ids stay unique), and
        ``{id(child): (module, attribute)}`` for submodules, parameters,
        buffers and plain tensor attributes. A child with several owners
        (tied weights, shared blocks) gets the one whose step reads first.
    """
    kinds: set[type] = set()
    stack: list[type] = [torch.nn.Module]
    while stack:
        kind = stack.pop()
        if kind not in kinds:
            kinds.add(kind)
            stack.extend(type.__subclasses__(kind))
    if given is not None:
        modules = {id(o): o for o in given if type(o) in kinds}
    else:
        objects = gc.get_objects()
        modules = {id(o): o for o in objects if type(o) in kinds}
        objects.clear()  # it holds every object: drop it before anything else runs
    tensor = torch.Tensor
    owners: dict[int, tuple[Any, str]] = {}
    for module in modules.values():
        attributes = _instance_dict(module)
        if attributes is None:
            continue
        children: list[tuple[str, Any]] = []
        for field in ("_modules", "_parameters", "_buffers"):
            inner = _lookup(attributes, field)
            if inner is not None and issubclass(type(inner), dict):
                children += [(k, v) for k, v in dict.items(inner) if type(k) is str]
        children += [
            (k, v)
            for k, v in dict.items(attributes)
            if type(k) is str and issubclass(type(v), tensor)
        ]
        label = _name(type(module))
        for name, child in children:
            if child is None:
                continue
            known = owners.get(id(child))
            if known is None or (label, name) < (_name(type(known[0])), known[1]):
                owners[id(child)] = (module, name)
    return modules, owners


def _running_frames(
    own_frame: types.FrameType, thread_names: dict[int | None, str]
) -> tuple[dict[int, list[tuple[str, str]]], dict[int, str], list[Any]]:
    """Locals of this thread's running frames by the id of their value; other threads' frames.

    Since Python 3.11 a running function's locals are invisible to
    ``gc.get_referrers``, so this thread's are read directly (vramkit's own
    frames and module level excluded). Another thread's frames are only named.

    Returns:
        ``{id(value): [(where, local name)]}`` for this thread,
        ``{id(frame): thread name}`` for the frames other threads are running,
        and the snapshots of locals read (reading ``f_locals`` stores a dict
        on the frame, which must not then count as a holder of its own).
    """
    me = threading.get_ident()
    mine: dict[int, list[tuple[str, str]]] = {}
    others: dict[int, str] = {}
    snapshots: list[Any] = []
    for ident, top in sys._current_frames().items():
        current: types.FrameType | None = top
        while current is not None:
            if ident != me:
                others[id(current)] = thread_names.get(ident, str(ident))
            elif (
                current is not own_frame
                and current.f_code.co_name != "<module>"  # its locals are its globals
                and not _is_vramkit(current.f_code)
            ):
                where = _where(current)
                scope: Any = current.f_locals
                snapshots.append(scope)
                for name, value in _items(scope):
                    mine.setdefault(id(value), []).append((where, name))
            current = current.f_back
    return mine, others, snapshots


def _handled_exception() -> BaseException | None:
    return sys.exc_info()[1]


def _heap_tensors() -> list[Any]:
    return tensors_in_heap()
