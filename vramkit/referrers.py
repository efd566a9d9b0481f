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
import threading
import time
import types
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vramkit._gc import exclusive, tensors_in_heap

__all__ = ["ReferrerChain", "find_referrers"]

_SKIP_MODULE_PREFIX = "vramkit."
_CONTAINERS = (list, tuple, dict, set, frozenset)
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
    # gc.get_referrers can hand us objects another thread is still building:
    # walk without thread switches and drop every reference before returning.
    with exclusive():
        search = _Search(ignore)
        try:
            return search.run(
                target, max_depth, max_chains, max_objects, time.perf_counter() + seconds
            )
        finally:
            search.close()
            del search


class _Search:
    """One backward walk over the referrer graph.

    Each level costs one ``gc.get_referrers`` scan of the heap (plus one for
    dict owners and two for closures), however wide the level is.
    """

    def __init__(self, ignore: Iterable[object]) -> None:
        self.ignored = {id(o) for o in ignore}
        # Objects are kept only in `held` (keyed by id) so the search's own
        # bookkeeping is easy to recognise and skip; paths hold strings only.
        self.held: dict[int, Any] = {}
        self.keep_alive: list[Any] = []  # scan results, kept so their ids stay unique
        self.tensors: list[Any] | None = None  # the heap's tensors, scanned once when needed
        self.internal: set[int] = {id(self.held), id(self.ignored), id(self.keep_alive)}
        self.own_frame = sys._getframe(1)  # find_referrers' frame
        self.running, self.executing = _running_frames(self.own_frame)
        # Names now: threading.enumerate() takes a lock, which the walk must not.
        self.thread_names = {t.ident: t.name for t in threading.enumerate()}
        self.internal.update(id(scope) for _, scope in self.running)
        self.internal.update((id(self.running), id(self.executing)))

    def close(self) -> None:
        """Drop every reference the search took."""
        self.held.clear()
        self.keep_alive.clear()
        self.tensors = None
        self.running.clear()
        self.executing.clear()

    def _scan(self, objects: list[Any]) -> list[Any]:
        """Every holder of any of ``objects``, minus the search's own containers."""
        self.internal.add(id(objects))
        # gc.get_referrers skips its own argument tuple, so nothing else to drop.
        found = gc.get_referrers(*objects) if objects else []
        self.keep_alive.append(found)
        self.internal.add(id(found))
        return found

    def _heap_tensors(self) -> list[Any]:
        """Every tensor in the heap, for autograd-graph holders: one scan per search."""
        if self.tensors is None:
            self.tensors = tensors_in_heap()
            self.keep_alive.append(self.tensors)
            self.internal.add(id(self.tensors))
        return self.tensors

    def _skip(self, holder: object) -> bool:
        return (
            id(holder) in self.internal
            or id(holder) in self.ignored
            or holder is self.own_frame
            or type(holder) is _Edge
            or type(holder) is _Search
        )

    def run(
        self, target: object, max_depth: int, max_chains: int, max_objects: int, deadline: float
    ) -> list[ReferrerChain]:
        self.held[id(target)] = target
        frontier: dict[int, tuple[tuple[str, ...], bool]] = {id(target): ((), False)}
        seen: set[int] = {id(target)}
        chains: list[ReferrerChain] = []
        # Paths whose top object nothing in Python refers to: it is held from native
        # code (an actor runtime, a C extension). No root, but the path still names
        # the holder a person can fix ("... -> Deployment.kept[0]"). A bare container
        # nobody refers to is a running function's local (invisible to the gc since
        # Python 3.11), most often the search's own caller's: not a holder to report.
        native: dict[int, tuple[tuple[str, ...], bool]] = {}
        tensor_type = _tensor_type()
        for _ in range(max_depth):
            level = self._level_edges([self.held[i] for i in frontier])
            next_frontier: dict[int, tuple[tuple[str, ...], bool]] = {}
            for oid, (path, attach_next) in frontier.items():
                obj = self.held[oid]
                edges = level.get(oid, []) + _running_frame_edges(obj, self.running)
                if issubclass(type(obj), tensor_type) and obj.requires_grad:
                    edges += _autograd_holders(obj, self._heap_tensors())
                if not edges and not isinstance(obj, _CONTAINERS):
                    native[oid] = (path, attach_next)
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
                    self.held[id(edge.holder)] = edge.holder
                    next_frontier[id(edge.holder)] = (new_path, edge.attach)
            if len(seen) > max_objects or time.perf_counter() > deadline:
                return _tidy(chains or _unknown({**native, **next_frontier}))
            if not next_frontier:
                return _tidy(chains or _unknown(native))
            frontier = next_frontier
        return _tidy(chains or _unknown({**native, **frontier}))

    def _level_edges(self, objects: list[Any]) -> dict[int, list[_Edge]]:
        """Edges from every holder of any of ``objects``, keyed by the held object's id."""
        wanted = {id(o): o for o in objects}
        self.internal.add(id(wanted))
        edges: dict[int, list[_Edge]] = {}
        dicts: list[tuple[dict[Any, Any], Any]] = []
        cells: list[tuple[types.CellType, Any]] = []
        for holder in self._scan(objects):
            if self._skip(holder) or isinstance(holder, types.ModuleType):
                continue  # a module refers to its dict, which is handled as the root
            if isinstance(holder, types.FrameType) and _is_vramkit(holder):
                continue  # vramkit's own frames (the unload in progress)
            if isinstance(holder, types.GeneratorType) and _is_vramkit_generator(holder):
                continue  # the same, suspended in or running a vramkit generator
            executing = (
                self.executing.get(id(holder)) if isinstance(holder, types.FrameType) else None
            )
            if executing is not None:
                if executing[1] != threading.get_ident():
                    # Another thread's running frame: name it, but do not read its locals.
                    for obj in (r for r in gc.get_referents(holder) if id(r) in wanted):
                        edges.setdefault(id(obj), []).append(
                            _Edge(
                                holder,
                                f"{_where(holder)}, a local of running thread "
                                f"{self.thread_names.get(executing[1], executing[1])!r}",
                                root="frame",
                            )
                        )
                continue  # this thread's running frames: _running_frame_edges
            held = {id(r): r for r in gc.get_referents(holder) if id(r) in wanted}
            if isinstance(holder, dict) and any(id(k) in wanted for k in holder):
                held.update((id(k), k) for k in holder if id(k) in wanted)
            for obj in held.values():
                if isinstance(holder, dict):
                    module = _module_owning(holder)
                    if module is not None:
                        edges.setdefault(id(obj), []).extend(
                            _Edge(module, f"{module.__name__}.{k}", root="module global")
                            for k in _keys_of(holder, obj)
                        )
                    else:
                        dicts.append((holder, obj))
                elif isinstance(holder, types.CellType):
                    cells.append((holder, obj))
                else:
                    edges.setdefault(id(obj), []).extend(_direct_edges(holder, obj))
        owners = self._dict_owners([d for d, _ in dicts])
        for mapping, obj in dicts:
            edges.setdefault(id(obj), []).extend(_dict_edges(mapping, obj, owners.get(id(mapping))))
        closures = self._closures([c for c, _ in cells])
        for cell, obj in cells:
            edges.setdefault(id(obj), []).extend(closures.get(id(cell), []))
        return edges

    def _dict_owners(
        self, dicts: list[dict[Any, Any]], depth: int = 2
    ) -> dict[int, tuple[Any, str]]:
        """For each dict, the object whose ``__dict__`` (or ``_parameters``...) it is."""
        if not dicts or depth == 0:
            return {}
        wanted = {id(d) for d in dicts}
        owners: dict[int, tuple[Any, str]] = {}
        self.internal.add(id(dicts))
        nested: list[tuple[dict[Any, Any], str, dict[Any, Any]]] = []
        for holder in self._scan(dicts):
            if self._skip(holder):
                continue
            if isinstance(holder, type):
                for mapping in dicts:
                    if _class_dict_matches(holder, mapping):
                        owners[id(mapping)] = (holder, "")
                continue
            if isinstance(holder, dict):
                for key in _MODULE_INTERNALS:  # nn.Module._parameters lives in __dict__
                    inner = holder.get(key)
                    if isinstance(inner, dict) and id(inner) in wanted:
                        nested.append((holder, key, inner))
                continue
            attributes = _instance_dict(holder)
            if attributes is None:
                continue
            if id(attributes) in wanted:
                owners[id(attributes)] = (holder, "")
            for key in _MODULE_INTERNALS:  # Python 3.11+: values inline in the instance
                inner = attributes.get(key)
                if isinstance(inner, dict) and id(inner) in wanted:
                    owners[id(inner)] = (holder, key)
        if nested:
            outer = self._dict_owners([o for o, _, _ in nested], depth - 1)
            for holder_dict, key, inner in nested:
                if id(holder_dict) in outer:
                    owners[id(inner)] = (outer[id(holder_dict)][0], key)
        return owners

    def _closures(self, cells: list[types.CellType]) -> dict[int, list[_Edge]]:
        """For each cell, the functions whose closure holds it, named with the variable."""
        if not cells:
            return {}
        by_id = {id(c): c for c in cells}
        self.internal.add(id(by_id))
        tuples = [t for t in self._scan(cells) if isinstance(t, tuple) and not self._skip(t)]
        edges: dict[int, list[_Edge]] = {}
        for function in self._scan(tuples):
            if not isinstance(function, types.FunctionType) or function.__closure__ is None:
                continue
            for index, cell in enumerate(function.__closure__):
                if id(cell) in by_id:
                    variable = function.__code__.co_freevars[index]
                    edges.setdefault(id(cell), []).append(
                        _Edge(
                            function, f"closure of {function.__qualname__} (variable {variable!r})"
                        )
                    )
        return edges


def _is_vramkit(frame: types.FrameType) -> bool:
    return str(frame.f_globals.get("__name__", "")).startswith(_SKIP_MODULE_PREFIX)


def _is_vramkit_generator(generator: types.GeneratorType[Any, Any, Any]) -> bool:
    frame = generator.gi_frame
    return frame is not None and _is_vramkit(frame)


def _instance_dict(holder: object) -> dict[str, Any] | None:
    try:
        attributes = getattr(holder, "__dict__", None)
    except Exception:  # proxies and odd descriptors may raise anything
        return None
    return attributes if isinstance(attributes, dict) else None


def _direct_edges(holder: Any, obj: object) -> list[_Edge]:
    """Edges from holders that need no further lookup (not dicts, not cells)."""
    if isinstance(holder, types.FrameType):
        return _frame_edges(holder, obj)
    if isinstance(holder, list | tuple):
        return [_Edge(holder, f"[{i}]", attach=True) for i in _positions(holder, obj)]
    if isinstance(holder, set | frozenset):
        return [_Edge(holder, "{...}", attach=True)]
    if isinstance(holder, types.MethodType):
        return [_Edge(holder, f"bound method {getattr(holder.__func__, '__qualname__', '?')}")]
    if isinstance(holder, types.TracebackType):
        return [_Edge(holder, "traceback")]
    if isinstance(holder, BaseException):
        return [_Edge(holder, f"{type(holder).__name__}.__traceback__")]
    return [_Edge(holder, _attribute_label(holder, obj))]


def _prepend(edge: _Edge, path: tuple[str, ...], attach_next: bool) -> tuple[str, ...]:
    """Put ``edge``'s label in front of ``path``, gluing index steps to their container."""
    if path and attach_next:
        return (edge.label + path[0], *path[1:])
    return (edge.label, *path)


def _unknown(frontier: dict[int, tuple[tuple[str, ...], bool]]) -> list[ReferrerChain]:
    paths = [path for path, _ in frontier.values() if path][:3]
    return [ReferrerChain("unknown", ("...", *path)) for path in paths]


def _tidy(chains: list[ReferrerChain]) -> list[ReferrerChain]:
    unique = {c.steps: c for c in chains}
    return sorted(unique.values(), key=lambda c: (c.root == "unknown", len(c.steps)))


def _tensor_type() -> type:
    torch = sys.modules.get("torch")
    return torch.Tensor if torch is not None else type(None)


def _positions(container: list[Any] | tuple[Any, ...], obj: object) -> list[int]:
    return [i for i, item in enumerate(container) if item is obj][:3]


def _keys_of(mapping: dict[Any, Any], obj: object) -> list[Any]:
    keys = [k for k, v in mapping.items() if v is obj]
    if not keys and obj in mapping:
        keys = [obj]
    return keys[:3]


def _dict_edges(mapping: dict[Any, Any], obj: object, owner: tuple[Any, str] | None) -> list[_Edge]:
    keys = _keys_of(mapping, obj) or ["?"]
    if owner is None:
        return [_Edge(mapping, f"[{k!r}]", attach=True) for k in keys]
    holder, prefix = owner
    if isinstance(holder, type) and not prefix:
        return [
            _Edge(holder, f"{holder.__module__}.{holder.__qualname__}.{k}", root="class attribute")
            for k in keys
        ]
    # nn.Module._parameters["weight"] reads as Linear.weight, like the attribute it is.
    return [_Edge(holder, f"{type(holder).__name__}.{k}") for k in keys]


def _module_owning(mapping: dict[Any, Any]) -> types.ModuleType | None:
    name = mapping.get("__name__")
    if isinstance(name, str):
        module = sys.modules.get(name)
        if module is not None and getattr(module, "__dict__", None) is mapping:
            return module
    return None


def _class_dict_matches(cls: type, mapping: dict[Any, Any]) -> bool:
    try:
        proxy = cls.__dict__
        return len(proxy) == len(mapping) and all(proxy[k] is v for k, v in mapping.items())
    except (KeyError, TypeError):
        return False


def _where(frame: types.FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    return f"{name}() in {os.path.basename(code.co_filename)}:{frame.f_lineno}"


def _frame_edges(frame: types.FrameType, obj: object) -> list[_Edge]:
    """A finished frame kept by a traceback: keep climbing to whoever holds the traceback."""
    names = [name for name, value in frame.f_locals.items() if value is obj] or ["?"]
    return [_Edge(frame, f"{_where(frame)} (finished), local {n}") for n in names]


def _running_frames(
    own_frame: types.FrameType,
) -> tuple[list[tuple[types.FrameType, dict[str, Any]]], dict[int, tuple[types.FrameType, int]]]:
    """This thread's executing frames with their locals, and every thread's executing frames.

    Since Python 3.11 a running function's locals are not visible to
    ``gc.get_referrers``, so this thread's are searched directly. Other
    threads' frames are only identified, never asked for ``f_locals``: reading
    the locals of a frame another thread is executing can crash CPython 3.11.

    Returns:
        ``[(frame, locals)]`` for this thread (vramkit's own frames and module
        level excluded), and ``{id(frame): (frame, thread id)}`` for every
        thread, frames kept alive so their ids stay unique.
    """
    me = threading.get_ident()
    mine: list[tuple[types.FrameType, dict[str, Any]]] = []
    every: dict[int, tuple[types.FrameType, int]] = {}
    for ident, top in sys._current_frames().items():
        current: types.FrameType | None = top
        while current is not None:
            every[id(current)] = (current, ident)
            module_level = current.f_code.co_name == "<module>"  # its locals are its globals
            if (
                ident == me
                and current is not own_frame
                and not module_level
                and not _is_vramkit(current)
            ):
                mine.append((current, dict(current.f_locals)))
            current = current.f_back
    return mine, every


def _running_frame_edges(
    obj: object, running: list[tuple[types.FrameType, dict[str, Any]]]
) -> list[_Edge]:
    return [
        _Edge(frame, f"{_where(frame)}, local {name}", root="frame")
        for frame, scope in running
        for name, value in scope.items()
        if value is obj
    ]


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


def _autograd_holders(tensor: Any, candidates: list[Any]) -> list[_Edge]:
    """Those of ``candidates`` whose autograd graph holds ``tensor`` (only C++ refers to it)."""
    try:
        ptr = tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return []
    if ptr == 0:
        return []
    edges = []
    for candidate in candidates:
        if candidate is tensor:
            continue
        node = getattr(candidate, "grad_fn", None)
        if node is None:
            continue
        route = _graph_route(node, ptr)
        if route is not None:
            middle = [route[0]] if len(route) <= 2 else [route[0], "..."]
            label = " -> ".join(["Tensor.grad_fn", *middle, route[-1]])
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
    # Leaves (weights) enter a graph through AccumulateGrad. Saved activations
    # (`_saved_*`) are not looked at: unpacking them creates new tensor objects.
    return ["variable"] if type(node).__name__ == "AccumulateGrad" else []


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
