"""Who still holds an object: readable referrer chains from a root down to the object.

When an object that should have died survives, :func:`find_referrers` walks the
garbage collector's referrer graph backwards until it reaches a root a person
recognises (a module global, a local variable of a running frame, a frame kept
by an exception's traceback) and writes the way down::

    __main__.cache[1] -> Tensor.grad_fn -> AddmmBackward0 -> TBackward0 -> AccumulateGrad.variable
    __main__.handlers['run'] -> closure of make.<locals>.predict (variable 'model') -> Linear.weight
    serve() in app.py:40, local batch[0] -> Tensor._base

Tensors held only from C++ by an autograd graph have no Python referrer; for
those the search also walks the graphs of live tensors that require grad, so an
output computed with grad enabled is named as the holder of the weights.

The search is bounded (depth, objects visited, seconds): it is for reports,
run after something went wrong, never on a hot path.
"""

from __future__ import annotations

import gc
import os
import sys
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

__all__ = ["ReferrerChain", "find_referrers"]

_SKIP_MODULE_PREFIX = "vramkit."
_MODULE_INTERNALS = {"_parameters": "", "_buffers": "", "_modules": ""}


@dataclass(frozen=True, slots=True)
class ReferrerChain:
    """One path from a root to the object that is still held.

    Attributes:
        root: What kind of root holds the path: ``"module global"``,
            ``"frame"``, ``"traceback"``, ``"class attribute"`` or
            ``"unknown"`` (the search ran out of depth or found no root, as
            with objects held only by C++ code).
        steps: The path, root first, each step readable on its own.
    """

    root: str
    steps: tuple[str, ...]

    def __str__(self) -> str:
        return " -> ".join(self.steps)


@dataclass(slots=True)
class _Edge:
    """One step up the graph: ``holder`` refers to the object below through ``label``."""

    holder: Any
    label: str
    attach: bool = False  # glue to the previous step ("cache" + "[3]") instead of " -> "
    root: str | None = None  # set when the holder is a root


def find_referrers(
    target: object,
    *,
    max_depth: int = 12,
    max_chains: int = 5,
    max_objects: int = 5000,
    seconds: float = 2.0,
    ignore: Iterable[object] = (),
) -> list[ReferrerChain]:
    """Name who holds ``target``, as chains from a root down to it.

    Args:
        target: The object that should have died.
        max_depth: Longest chain, in steps.
        max_chains: Stop after this many chains.
        max_objects: Stop after visiting this many holders.
        seconds: Stop after this long.
        ignore: Objects whose references do not count (the caller's own).

    Returns:
        Chains, shortest first. Empty when nothing in Python holds ``target``.
    """
    deadline = time.perf_counter() + seconds
    ignored = {id(o) for o in ignore}
    # Objects are kept only in `held` (keyed by id) so the search's own
    # bookkeeping is easy to recognise and skip; paths hold strings only.
    held: dict[int, Any] = {id(target): target}
    internal: set[int] = {id(held), id(ignored)}
    keep_alive: list[list[Any]] = []  # get_referrers results, kept so their ids stay unique
    internal.add(id(keep_alive))
    frontier: list[tuple[int, tuple[str, ...], bool]] = [(id(target), (), False)]
    seen: set[int] = {id(target)}
    chains: list[ReferrerChain] = []
    own_frame = sys._getframe()
    running = _running_frames(own_frame)
    internal.update(id(scope) for _, scope in running)
    internal.add(id(running))
    for _ in range(max_depth):
        next_frontier: list[tuple[int, tuple[str, ...], bool]] = []
        for oid, path, attach_next in frontier:
            obj = held[oid]
            edges = _edges_to(obj, internal, ignored, keep_alive, own_frame)
            edges += _running_frame_edges(obj, running)
            if issubclass(type(obj), _tensor_type()) and obj.requires_grad:
                edges += _autograd_holders(obj, internal, keep_alive)
            for edge in edges:
                new_path = _prepend(edge, path, attach_next)
                if edge.root is not None:
                    chains.append(ReferrerChain(edge.root, new_path))
                    if len(chains) >= max_chains:
                        return _tidy(chains)
                    continue
                if id(edge.holder) in seen:
                    continue
                seen.add(id(edge.holder))
                held[id(edge.holder)] = edge.holder
                next_frontier.append((id(edge.holder), new_path, edge.attach))
            if len(seen) > max_objects or time.perf_counter() > deadline:
                return _tidy(chains or _unknown(next_frontier))
        if not next_frontier:
            break
        frontier = next_frontier
    else:
        if not chains:
            chains = _unknown(frontier)
    return _tidy(chains)


def _prepend(edge: _Edge, path: tuple[str, ...], attach_next: bool) -> tuple[str, ...]:
    """Put ``edge``'s label in front of ``path``, gluing index steps to their container."""
    if path and attach_next:
        return (edge.label + path[0], *path[1:])
    return (edge.label, *path)


def _unknown(frontier: list[tuple[int, tuple[str, ...], bool]]) -> list[ReferrerChain]:
    return [ReferrerChain("unknown", ("...", *path)) for _, path, _ in frontier[:3] if path]


def _tidy(chains: list[ReferrerChain]) -> list[ReferrerChain]:
    unique = {c.steps: c for c in chains}
    return sorted(unique.values(), key=lambda c: (c.root == "unknown", len(c.steps)))


def _tensor_type() -> type:
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else type(None)


def _edges_to(
    obj: object,
    internal: set[int],
    ignored: set[int],
    keep_alive: list[list[Any]],
    own_frame: types.FrameType,
) -> list[_Edge]:
    referrers = gc.get_referrers(obj)
    keep_alive.append(referrers)
    internal.add(id(referrers))
    edges: list[_Edge] = []
    for holder in referrers:
        if (
            id(holder) in internal
            or id(holder) in ignored
            or holder is own_frame
            or type(holder) is _Edge
        ):
            continue
        if isinstance(holder, types.FrameType):
            if _is_running(holder):
                continue  # running frames are searched by _running_frame_edges
            if holder.f_globals.get("__name__", "").startswith(_SKIP_MODULE_PREFIX):
                continue  # vramkit's own frames (the unload in progress)
            edges.extend(_frame_edges(holder, obj))
        elif isinstance(holder, dict):
            edges.extend(_dict_edges(holder, obj, internal, keep_alive))
        elif isinstance(holder, list | tuple):
            edges.extend(_Edge(holder, f"[{i}]", attach=True) for i in _positions(holder, obj))
        elif isinstance(holder, set | frozenset):
            edges.append(_Edge(holder, "{...}", attach=True))
        elif isinstance(holder, types.CellType):
            edges.extend(_cell_edges(holder, internal, keep_alive))
        elif isinstance(holder, types.MethodType):
            name = getattr(holder.__func__, "__qualname__", "?")
            edges.append(_Edge(holder, f"bound method {name}"))
        elif isinstance(holder, types.TracebackType):
            edges.append(_Edge(holder, "traceback"))
        elif isinstance(holder, BaseException):
            edges.append(_Edge(holder, f"{type(holder).__name__}.__traceback__"))
        elif isinstance(holder, types.ModuleType):
            continue  # modules refer to their dict, which is handled as a root
        else:
            edges.append(_Edge(holder, _attribute_label(holder, obj)))
    return edges


def _positions(container: list[Any] | tuple[Any, ...], obj: object) -> list[int]:
    return [i for i, item in enumerate(container) if item is obj][:3]


def _keys_of(mapping: dict[Any, Any], obj: object) -> list[Any]:
    keys = [k for k, v in mapping.items() if v is obj]
    if not keys and obj in mapping:
        keys = [obj]
    return keys[:3]


def _dict_edges(
    mapping: dict[Any, Any], obj: object, internal: set[int], keep_alive: list[list[Any]]
) -> list[_Edge]:
    keys = _keys_of(mapping, obj) if not isinstance(obj, dict) or obj is not mapping else []
    if not keys:
        keys = ["?"]
    module = _module_owning(mapping)
    if module is not None:
        return [_Edge(module, f"{module.__name__}.{k}", root="module global") for k in keys]
    owner = _owner_of_dict(mapping, internal, keep_alive)
    if owner is not None:
        holder, prefix = owner
        if prefix in _MODULE_INTERNALS:  # nn.Module._parameters["weight"] -> Linear.weight
            return [_Edge(holder, f"{type(holder).__name__}.{k}") for k in keys]
        if isinstance(holder, type):
            return [
                _Edge(
                    holder, f"{holder.__module__}.{holder.__qualname__}.{k}", root="class attribute"
                )
                for k in keys
            ]
        return [_Edge(holder, f"{type(holder).__name__}.{k}") for k in keys]
    return [_Edge(mapping, f"[{k!r}]", attach=True) for k in keys]


def _module_owning(mapping: dict[Any, Any]) -> types.ModuleType | None:
    name = mapping.get("__name__")
    if isinstance(name, str):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__dict__", None) is mapping:
            return module
    return None


def _owner_of_dict(
    mapping: dict[Any, Any], internal: set[int], keep_alive: list[list[Any]]
) -> tuple[Any, str] | None:
    """The object whose ``__dict__`` is ``mapping`` (or whose ``_parameters`` etc. it is)."""
    referrers = gc.get_referrers(mapping)
    keep_alive.append(referrers)
    internal.add(id(referrers))
    for holder in referrers:
        if id(holder) in internal:
            continue
        if isinstance(holder, type) and _class_dict_matches(holder, mapping):
            return holder, ""
        if getattr(holder, "__dict__", None) is mapping:
            return holder, ""
        if isinstance(holder, dict):
            for key, value in holder.items():
                if value is mapping and key in _MODULE_INTERNALS:
                    grand = _owner_of_dict(holder, internal, keep_alive)
                    if grand is not None:
                        return grand[0], key
    return None


def _class_dict_matches(cls: type, mapping: dict[Any, Any]) -> bool:
    try:
        proxy = cls.__dict__
        return len(proxy) == len(mapping) and all(proxy[k] is v for k, v in mapping.items())
    except (KeyError, TypeError):
        return False


def _cell_edges(
    cell: types.CellType, internal: set[int], keep_alive: list[list[Any]]
) -> list[_Edge]:
    """A cell belongs to closures: name the function and the captured variable."""
    edges: list[_Edge] = []
    tuples = gc.get_referrers(cell)
    keep_alive.append(tuples)
    internal.add(id(tuples))
    for closure in tuples:
        if not isinstance(closure, tuple):
            continue
        functions = gc.get_referrers(closure)
        keep_alive.append(functions)
        internal.add(id(functions))
        for function in functions:
            if isinstance(function, types.FunctionType) and function.__closure__ is closure:
                index = closure.index(cell)
                variable = function.__code__.co_freevars[index]
                edges.append(
                    _Edge(function, f"closure of {function.__qualname__} (variable {variable!r})")
                )
    return edges


def _where(frame: types.FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    return f"{name}() in {os.path.basename(code.co_filename)}:{frame.f_lineno}"


def _frame_edges(frame: types.FrameType, obj: object) -> list[_Edge]:
    """A finished frame kept by a traceback: keep climbing to whoever holds the traceback."""
    names = [name for name, value in frame.f_locals.items() if value is obj] or ["?"]
    return [_Edge(frame, f"{_where(frame)} (finished), local {n}") for n in names]


def _running_frames(own_frame: types.FrameType) -> list[tuple[types.FrameType, dict[str, Any]]]:
    """Frames executing now in any thread (not vramkit's own), with their locals.

    Since Python 3.11 a running function's locals are not visible to
    ``gc.get_referrers``, so they are searched directly.
    """
    frames = []
    for top in sys._current_frames().values():
        current: types.FrameType | None = top
        while current is not None:
            name = current.f_globals.get("__name__", "")
            module_level = current.f_code.co_name == "<module>"  # its locals are its globals
            if (
                current is not own_frame
                and not module_level
                and not name.startswith(_SKIP_MODULE_PREFIX)
            ):
                frames.append((current, dict(current.f_locals)))
            current = current.f_back
    return frames


def _running_frame_edges(
    obj: object, running: list[tuple[types.FrameType, dict[str, Any]]]
) -> list[_Edge]:
    return [
        _Edge(frame, f"{_where(frame)}, local {name}", root="frame")
        for frame, scope in running
        for name, value in scope.items()
        if value is obj
    ]


def _is_running(frame: types.FrameType) -> bool:
    for top in sys._current_frames().values():
        current: types.FrameType | None = top
        while current is not None:
            if current is frame:
                return True
            current = current.f_back
    return False


def _attribute_label(holder: object, obj: object) -> str:
    kind = type(holder).__name__
    # Python 3.11+ keeps instance attributes inline: the instance itself is the referrer.
    attributes = getattr(holder, "__dict__", None)
    if isinstance(attributes, dict):
        for name, value in attributes.items():
            if value is obj:
                return f"{kind}.{name}"
    for name in getattr(type(holder), "__slots__", ()) or ():
        if getattr(holder, name, None) is obj:
            return f"{kind}.{name}"
    for name in ("__self__", "__func__", "_base", "grad", "__wrapped__"):
        try:
            if getattr(holder, name, None) is obj:
                return f"{kind}.{name}"
        except Exception:  # odd descriptors raise anything: try the next name
            continue
    return kind


def _autograd_holders(tensor: Any, internal: set[int], keep_alive: list[list[Any]]) -> list[_Edge]:
    """Live tensors whose autograd graph holds ``tensor`` (only C++ refers to it)."""
    try:
        ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return []
    if ptr == 0:
        return []
    from vramkit.tensors import tensors_in_heap

    candidates = tensors_in_heap()
    keep_alive.append(candidates)
    internal.add(id(candidates))
    edges = []
    for candidate in candidates:
        if candidate is tensor:
            continue
        node = getattr(candidate, "grad_fn", None)
        if node is None:
            continue
        route = _graph_route(node, ptr)
        if route is not None:
            label = " -> ".join(["Tensor.grad_fn", *route])
            edges.append(_Edge(candidate, label))
            if len(edges) >= 3:
                break
    return edges


def _graph_route(root: Any, ptr: int, limit: int = 10_000) -> list[str] | None:
    """Node names from ``root`` to the node that holds storage ``ptr``, or ``None``."""
    parents: dict[int, tuple[int | None, Any]] = {id(root): (None, root)}
    queue = [root]
    while queue and len(parents) < limit:
        node = queue.pop(0)
        for attr in _held_tensor_attrs(node):
            try:
                held = getattr(node, attr)
                if held is not None and held.untyped_storage().data_ptr() == ptr:
                    return _route(parents, id(node), f"{type(node).__name__}.{attr}")
            except (RuntimeError, AttributeError, NotImplementedError):
                continue
        for child, _ in getattr(node, "next_functions", ()):
            if child is not None and id(child) not in parents:
                parents[id(child)] = (id(node), child)
                queue.append(child)
    return None


def _held_tensor_attrs(node: Any) -> list[str]:
    names = ["variable"] if type(node).__name__ == "AccumulateGrad" else []
    return names + [n for n in dir(node) if n.startswith("_saved_") and "sym" not in n]


def _route(parents: dict[int, tuple[int | None, Any]], last: int, leaf: str) -> list[str]:
    """Node names from the graph's root down to ``leaf`` (the node holding the tensor)."""
    names = [leaf]
    parent = parents[last][0]
    while parent is not None:
        grand, node = parents[parent]
        names.append(type(node).__name__)
        parent = grand
    names.reverse()
    return names
