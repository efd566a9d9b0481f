"""Who still holds an object: readable referrer chains from a root down to the object.

When an object that should have died survives, :func:`find_referrers` walks the
garbage collector's referrer graph backwards until it reaches a root a person
recognises and writes the way down::

    __main__.cache[1] -> Tensor.grad_fn -> AddmmBackward0 -> ... -> AccumulateGrad.variable
    __main__.handlers['run'] -> closure of make.<locals>.predict (variable 'model') -> Linear.weight
    serve() in app.py:40, local batch[0]

Roots are module globals, class attributes, locals of running frames (of this
thread; another thread's running frame is named, never read), and exceptions
being handled. On the way the search names container indices and keys, object
attributes (``nn.Module`` parameters read as ``Linear.weight``), closure cells,
bound methods, finished frames kept by tracebacks, suspended generators, and
autograd graphs: a weight held only from C++ by a graph's ``AccumulateGrad``
node is traced to the live tensor whose ``grad_fn`` reaches it.

Two promises make the search safe to run on any heap, including one full of
other people's objects:

- **Identity only.** It never calls ``==``, ``in``, ``hash()``, ``repr()``,
  ``__getattr__``, properties or any other Python-level method of a foreign
  object: it compares with ``is``, reads dicts, lists and slots through their
  C-level accessors, and asks ``gc.get_referents`` what an object refers to. A
  ``transformers`` ``ModelOutput`` or an EasyDict in a chain cannot make it fail.
- **Bounded by work, not time.** Each level of the walk is one scan of the
  heap; the depth, the width of each level and the number of holders examined
  are capped, and each level is processed whole and sorted by what it reads
  like. So the same heap gives the same chains in the same order, on an idle
  machine and a busy one. ``seconds=`` adds an optional wall-clock cap for
  interactive use (off by default; it makes results depend on load).

Nothing escapes: a failure inside the search becomes a chain rooted at
``"unknown"`` that says the holder was not found and why.
"""

from __future__ import annotations

import functools
import gc
import os
import sys
import threading
import time
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vramkit._gc import exclusive, tensors_in_heap
from vramkit._units import check_flag, parse_timeout
from vramkit.errors import InvalidArgumentError

__all__ = ["ReferrerChain", "find_holders", "find_holders_each", "find_referrers"]

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep
# A step through an instance dict, or the dicts where nn.Module keeps parameters,
# buffers and submodules, reads as the attribute it stands for (``Linear.weight``).
_MODULE_INTERNALS = frozenset({"_parameters", "_buffers", "_modules", "__dict__"})
_WIDTH = 32  # holders carried to the next level (more only when tied by text)
_LEVEL_HOLDERS = 50_000  # holders of one level beyond which the walk gives up
_GRAPH_NODES = 20_000  # autograd nodes visited per search
_ROOT_ORDER = {"module global": 0, "frame": 1, "class attribute": 2, "traceback": 3}

# C-level accessors, fetched once: calling them never runs Python code of the object.
_type_mro: Any = type.__dict__["__mro__"]
_type_dict: Any = type.__dict__["__dict__"]
_type_name: Any = type.__dict__["__name__"]
_type_module: Any = type.__dict__["__module__"]
_type_qualname: Any = type.__dict__["__qualname__"]
_module_dict: Any = vars(types.ModuleType)["__dict__"]
_SAFE_KEYS = (str, int, float, bool, bytes, type(None))
_EXCEPTION_FIELDS: dict[str, Any] = {
    name: vars(BaseException)[name]
    for name in ("__traceback__", "__context__", "__cause__", "args")
}
_CONTAINERS = (list, tuple, dict, set, frozenset)
_SUSPENDABLE = (types.GeneratorType, types.CoroutineType, types.AsyncGeneratorType)


@dataclass(frozen=True, slots=True)
class ReferrerChain:
    """One path from a root to the object that is still held.

    Attributes:
        root: What kind of root holds the path: ``"module global"``,
            ``"frame"`` (a local of a running function), ``"class attribute"``,
            ``"traceback"`` (an exception being handled), or ``"unknown"`` (the
            search reached its bounds, or failed, before a root; the steps then
            start with ``"..."`` or say why).
        steps: The path, root first, each step readable on its own.
    """

    root: str
    steps: tuple[str, ...]

    def __str__(self) -> str:
        return " -> ".join(self.steps)


# A step of a path, as data until the path is rendered: (kind, text, extra).
#   ("module", "pkg.mod", "")          root: a module's globals dict
#   ("class", "pkg.mod.Cls", "")       root: a class's namespace
#   ("key", "'name'", "name")          a dict entry (extra: the key if a str)
#   ("index", "3", "")                 a list or tuple item
#   ("set", "", "")                    a set member
#   ("cell", "", "")                   a closure cell
#   ("closure", "qualname", "a b c")   a function's closure tuple (extra: free vars)
#   ("attr", "Type", "name")           an attribute of an object
#   ("text", "...", "")                anything already readable
_Token = tuple[str, str, str]


@dataclass(slots=True)
class _Path:
    """A frontier entry: the object's id and the steps from it down to its target."""

    oid: int
    tokens: tuple[_Token, ...]
    target: int  # index of the target this path leads to
    text: str = ""  # rendered tokens, the sort key that keeps the walk deterministic


def find_referrers(
    target: object,
    *,
    max_depth: int = 12,
    max_chains: int = 5,
    max_objects: int = 5000,
    seconds: float | None = None,
    ignore: Iterable[object] = (),
) -> list[ReferrerChain]:
    """Name who holds ``target``, as chains from a root down to it.

    Args:
        target: The object that should have died.
        max_depth: Most objects on a chain (each is one scan of the heap).
        max_chains: Stop after the level where this many chains were found.
        max_objects: Stop after the level where this many holders were examined.
        seconds: Optional wall-clock cap, checked between levels (default: none,
            so the result does not depend on how busy the machine is).
        ignore: Objects whose references do not count (the caller's own).

    Returns:
        Chains, best first (module globals, then frames...; shorter first).
        Empty when nothing in Python holds ``target``. When the bounds are
        reached first, chains rooted at ``"unknown"`` show how far the search
        got; when the search itself fails, one ``"unknown"`` chain says so.

    Raises:
        InvalidArgumentError: A bound that is not a whole number >= 1, a
            ``seconds`` that is not seconds >= 0 (or ``None``), or an
            ``ignore`` that is not an iterable.
    """
    return find_holders(
        [target],
        max_depth=max_depth,
        max_chains=max_chains,
        max_objects=max_objects,
        seconds=seconds,
        ignore=ignore,
    )


def find_holders(
    targets: Sequence[object],
    *,
    max_depth: int = 12,
    max_chains: int = 5,
    max_objects: int = 5000,
    seconds: float | None = None,
    ignore: Iterable[object] = (),
    modules: Iterable[object] | None = None,
    heap_tensors: list[Any] | None = None,
    first_only: bool = False,
) -> list[ReferrerChain]:
    """Like :func:`find_referrers` for several targets at once, sharing each heap scan.

    Targets earlier in ``targets`` are preferred when chains are cut to ``max_chains``.

    Args:
        targets: The objects that should have died.
        max_depth: See :func:`find_referrers`.
        max_chains: See :func:`find_referrers`.
        max_objects: See :func:`find_referrers`.
        seconds: See :func:`find_referrers`.
        ignore: See :func:`find_referrers`.
        modules: The ``nn.Module`` objects whose trees to climb without heap
            scans (default: every live module, found with one pass over the
            heap). A caller that knows the model's modules saves that pass.
        heap_tensors: The heap's tensors, when the caller already has them
            (for autograd holders and views).
        first_only: Stop at the level where every target got its first chain
            from a root (a faster answer, for reports that show one or two).
    """
    limit = _check_search(targets, max_depth, max_chains, max_objects, seconds, ignore)
    check_flag(first_only, "first_only")
    pairs = _search(
        targets,
        max_depth,
        max_chains,
        max_objects,
        limit,
        ignore,
        modules,
        heap_tensors,
        first_only=first_only,
    )
    return _best(pairs, max_chains)


def find_holders_each(
    targets: Sequence[object],
    *,
    max_depth: int = 12,
    max_chains: int = 3,
    max_objects: int = 5000,
    seconds: float | None = None,
    ignore: Iterable[object] = (),
) -> list[list[ReferrerChain]]:
    """The chains of each of ``targets`` (same order), found in one shared search.

    Arguments as for :func:`find_holders`; ``max_chains`` applies per target,
    and the walk stops at the level where every target has a chain from a root.
    """
    limit = _check_search(targets, max_depth, max_chains, max_objects, seconds, ignore)
    enough = max_chains * len(targets)
    pairs = _search(
        targets, max_depth, enough, max_objects, limit, ignore, None, None, first_only=True
    )
    return [
        _best([pair for pair in pairs if pair[0] == index], max_chains)
        for index in range(len(targets))
    ]


def _search(
    targets: Sequence[object],
    max_depth: int,
    enough: int,
    max_objects: int,
    seconds: float | None,
    ignore: Iterable[object],
    modules: Iterable[object] | None,
    heap_tensors: list[Any] | None,
    *,
    first_only: bool,
) -> list[tuple[int, ReferrerChain]]:
    # Thread names before the walk: threading.enumerate() takes a lock.
    names = {t.ident: t.name for t in threading.enumerate()}
    deadline = None if seconds is None else time.perf_counter() + float(seconds)
    try:
        with exclusive():
            search = _Search(targets, ignore, names, max_objects, deadline)
            search.first_only = first_only
            if modules is not None:
                search.given_modules = list(modules)
                search._own(search.given_modules)
            if heap_tensors is not None:
                search.heap_tensors = heap_tensors
                search.given_heap = True
                search._own(heap_tensors)
            try:
                return search.run(max_depth, enough)
            finally:
                search.close()
                del search
    except Exception as exc:  # a report must never fail the unload it explains
        return [(0, _not_found(f"search failed: {type(exc).__name__}"))]


def _not_found(why: str) -> ReferrerChain:
    return ReferrerChain("unknown", (f"holder not found ({why})",))


def _check_search(
    targets: object,
    max_depth: object,
    max_chains: object,
    max_objects: object,
    seconds: object,
    ignore: object,
) -> float | None:
    """Check the search's arguments; returns the seconds it may take (``None``: no limit).

    The search itself turns any failure into a "holder not found" chain (a report
    must never fail the unload it explains), so a caller's mistake is caught here.
    """
    if isinstance(targets, str | bytes) or not isinstance(targets, Sequence):
        raise InvalidArgumentError(
            f"targets must be a sequence of objects (a list or tuple); got {targets!r}"
        )
    for what, value in (
        ("max_depth", max_depth),
        ("max_chains", max_chains),
        ("max_objects", max_objects),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidArgumentError(f"{what} must be a whole number, 1 or more; got {value!r}")
    if isinstance(ignore, str | bytes) or not isinstance(ignore, Iterable):
        raise InvalidArgumentError(
            f"ignore must be an iterable of objects (a list or tuple); got {ignore!r}"
        )
    return parse_timeout(seconds, "seconds")


class _Search:
    """One backward walk, level by level, from the targets towards roots."""

    def __init__(
        self,
        targets: Sequence[object],
        ignore: Iterable[object],
        thread_names: dict[int | None, str],
        max_objects: int,
        deadline: float | None,
    ) -> None:
        self.targets = list(targets)
        self.held: dict[int, Any] = {id(t): t for t in self.targets}
        self.keep: list[Any] = [targets]  # scan results, kept so the ids in them stay unique
        self.ignored = {id(o) for o in ignore} | {id(targets)}  # the caller's list of targets
        self.internal = {id(self.held), id(self.keep), id(self.ignored), id(self.targets)}
        self.own_frame = sys._getframe(1)
        self.max_objects = max_objects
        self.deadline = deadline
        self.examined = 0
        self.heap_tensors: list[Any] | None = None
        self.owners: dict[int, tuple[Any, str]] | None = None
        self.modules: dict[int, Any] = {}
        self.given_modules: list[Any] | None = None
        self.given_heap = False
        self.first_only = False
        self.levels = 0
        self.native: list[_Path] = []  # paths ending at objects only native code holds
        self.module_dicts = _module_dicts()
        self.locals, self.other_threads, snapshots = _running_frames(self.own_frame, thread_names)
        self._own(snapshots)
        self.internal.update(id(scope) for scope in snapshots)
        self.handled = _handled_exception()

    def close(self) -> None:
        """Drop every reference the search took."""
        self.held.clear()
        self.keep.clear()
        self.targets.clear()
        self.locals.clear()
        self.other_threads.clear()
        self.heap_tensors = None
        self.owners = None
        self.modules = {}
        self.given_modules = None
        self.handled = None

    # ---------------------------------------------------------------- the walk

    def run(self, max_depth: int, enough: int) -> list[tuple[int, ReferrerChain]]:
        """``(target index, chain)`` pairs, walking until ``enough`` chains or a bound."""
        frontier = [_Path(id(t), (), i) for i, t in enumerate(self.targets)]
        # One path per object and target: a holder shared by two targets' chains
        # (a dict holding both) is walked once for each.
        seen = {(i, id(t)) for i, t in enumerate(self.targets)}
        self._own(seen)
        frontier = self._climb(frontier, seen)
        chains = self._direct_roots(frontier)
        for _ in range(max_depth):
            # Enough once there are ``enough`` chains from roots other than a
            # running frame's local (those come for free and are often the
            # caller's own), or, asked for a first answer, one per target.
            rooted = [target for target, chain in chains if chain.root != "frame"]
            if len(rooted) >= enough or (self.first_only and len(set(rooted)) == len(self.targets)):
                break
            if self.examined >= self.max_objects:
                break
            if self.deadline is not None and time.perf_counter() > self.deadline:
                break
            found, following = self._level(frontier, seen)
            following = self._climb(following, seen)
            chains += found + self._direct_roots(following)
            frontier = following
            if not frontier:
                break
        if all(chain.root == "frame" for _, chain in chains):
            # No global root: name the objects only native code holds (a Ray
            # actor's deployment instance), then show how far a cut walk got.
            ends = [*self.native, *frontier][:3]
            chains += [(p.target, _partial(p)) for p in ends if p.tokens]
        return chains

    def _own(self, container: Any) -> None:
        """Mark one of the search's own containers as never a holder.

        It stays alive until the search ends, so its id cannot be reused by an
        object that is a holder.
        """
        self.keep.append(container)
        self.internal.add(id(container))

    def _climb(self, frontier: list[_Path], seen: set[tuple[int, int]]) -> list[_Path]:
        """Add, for each tensor or module in an ``nn.Module`` tree, the top of that tree.

        Climbing ``Linear.weight -> ModuleList.0 -> Encoder.layers -> Model.encoder``
        through the gc would cost two heap scans per module (the module, then
        the dict it sits in); the module index makes it free, and the next
        scan looks for the holders of the object and of its top module at once.
        """
        owners = self._module_owners(frontier)
        if not owners:
            return frontier
        climbed = list(frontier)
        for path in frontier:
            tokens = path.tokens
            current = path.oid
            climbed_any = False
            while current in owners:
                module, name = owners[current]
                tokens = (("attr", _name(type(module)), name), *tokens)
                current = id(module)
                if (path.target, current) in seen:
                    break
                climbed_any = True
            # The modules on the way stay unseen: the scan still walks up through
            # them, so a holder of a submodule (a kept block) is found too.
            if not climbed_any or (path.target, current) in seen:
                continue
            seen.add((path.target, current))
            self.held[current] = self.modules[current]
            climbed.append(_Path(current, tokens, path.target, " -> ".join(_render(tokens))))
        return climbed

    def _module_owners(self, frontier: list[_Path]) -> dict[int, tuple[Any, str]]:
        """The module index, built at the first frontier holding a tensor or a module."""
        if self.owners is not None:
            return self.owners
        torch = sys.modules.get("torch")
        if torch is None:
            return {}
        kinds = (torch.Tensor, torch.nn.Module)
        if not any(issubclass(type(self.held[p.oid]), kinds) for p in frontier):
            return {}
        self.modules, self.owners = _module_index(torch, self.given_modules)
        self._own(self.modules)
        self._own(self.owners)
        return self.owners

    def _direct_roots(self, frontier: list[_Path]) -> list[tuple[int, ReferrerChain]]:
        """Roots that need no scan: locals of this thread's running frames, handled exceptions."""
        found = []
        for path in frontier:
            for where, name in self.locals.get(path.oid, ()):
                tokens = (("text", f"{where}, local {name}", ""), *path.tokens)
                found.append((path.target, ReferrerChain("frame", _render(tokens))))
            if self.handled is not None and path.oid == id(self.handled):
                tokens = (("text", "the exception being handled", ""), *path.tokens)
                found.append((path.target, ReferrerChain("traceback", _render(tokens))))
        return found

    def _level(
        self, frontier: list[_Path], seen: set[tuple[int, int]]
    ) -> tuple[list[tuple[int, ReferrerChain]], list[_Path]]:
        """One scan: the holders of every frontier object, as chains (roots) or new paths."""
        by_id: dict[int, list[_Path]] = {}
        for path in frontier:
            by_id.setdefault(path.oid, []).append(path)
        self._own(by_id)
        objects = [self.held[oid] for oid in by_id]
        self._own(objects)
        holders = gc.get_referrers(*objects)
        self._own(holders)
        if len(holders) > _LEVEL_HOLDERS:
            self.examined = self.max_objects
            return [], []
        chains: list[tuple[int, ReferrerChain]] = []
        following: list[_Path] = []
        orphans = dict(by_id)  # frontier objects no Python object holds (C++ may)
        self._own(orphans)
        for holder in holders:
            if self._skip(holder):
                continue
            self.examined += 1
            for child in gc.get_referents(holder):
                paths = by_id.get(id(child))
                if paths is None:
                    continue
                orphans.pop(id(child), None)
                for tokens, root in _edges(self, holder, child):
                    for path in paths:
                        self._extend(holder, path, tokens, root, seen, chains, following)
        # Walking graphs needs the heap's tensors: for the targets themselves and
        # whenever the caller handed them over, else only for tensors no Python
        # object holds (above the targets, a graph is rarely the holder).
        first = self.levels == 0
        self.levels += 1
        candidates = by_id if self.given_heap or first else orphans
        for holder, child, tokens in self._autograd_edges([self.held[i] for i in candidates]):
            orphans.pop(id(child), None)
            for path in by_id[id(child)]:
                self._extend(holder, path, tokens, None, seen, chains, following)
        self.native += [
            path for oid, paths in orphans.items() if self._native(oid) for path in paths
        ]
        return chains, _narrow(following)

    def _native(self, oid: int) -> bool:
        """Whether an object no Python object holds is held by native code (a holder to name).

        A bare container nobody refers to is a running function's local (those
        are invisible to the gc since Python 3.11), most often a caller's own.
        """
        return not issubclass(type(self.held[oid]), _CONTAINERS) and oid not in self.locals

    def _extend(
        self,
        holder: Any,
        path: _Path,
        tokens: tuple[_Token, ...],
        root: str | None,
        seen: set[tuple[int, int]],
        chains: list[tuple[int, ReferrerChain]],
        following: list[_Path],
    ) -> None:
        joined = (*tokens, *path.tokens)
        if root is not None:
            chains.append((path.target, ReferrerChain(root, _render(joined))))
            return
        if (path.target, id(holder)) in seen:
            return
        seen.add((path.target, id(holder)))
        self.held[id(holder)] = holder
        following.append(_Path(id(holder), joined, path.target, " -> ".join(_render(joined))))

    def _skip(self, holder: object) -> bool:
        kind = type(holder)
        if id(holder) in self.internal or id(holder) in self.ignored or holder is self.own_frame:
            return True
        if kind is _Path or kind is _Search:
            return True
        if issubclass(kind, types.ModuleType):
            return True  # a module refers to its dict, which is the root
        if kind is types.FrameType:
            return _is_vramkit(holder.f_code)  # type: ignore[attr-defined]
        if kind in _SUSPENDABLE:
            return _is_vramkit(_suspended_code(holder))  # vramkit's generators (this search)
        return False

    # ---------------------------------------------------------------- autograd

    def _autograd_edges(self, frontier: list[Any]) -> list[tuple[Any, Any, tuple[_Token, ...]]]:
        """Live tensors that hold a frontier tensor from C++: a view's base, a graph's weight.

        ``gc`` cannot see these edges: a view keeps its base in C++, and an
        autograd graph keeps its weights in ``AccumulateGrad`` nodes. The
        heap's tensors (and their graphs) are read instead, for ``frontier``.
        """
        torch = sys.modules.get("torch")
        if torch is None:
            return []
        tensors = [obj for obj in frontier if issubclass(type(obj), torch.Tensor)]
        if not tensors:
            return []
        wanted: dict[int, Any] = {}
        storages: dict[int, Any] = {}
        with torch._C.DisableTorchFunctionSubclass():
            found = self._views_of({id(t): t for t in tensors})
            for obj in tensors:
                if _is_grad_leaf(obj):
                    wanted[id(obj)] = obj
                    key = _storage_key(obj)
                    if key is not None:
                        storages.setdefault(key, obj)
            if wanted:
                found += self._graph_walk(wanted, storages)
        tensors.clear()
        return found

    def _views_of(self, bases: dict[int, Any]) -> list[tuple[Any, Any, tuple[_Token, ...]]]:
        """Heap tensors that are views of ``bases`` (``view._base``), as edges."""
        if self.heap_tensors is None:
            self.heap_tensors = _heap_tensors()
            self._own(self.heap_tensors)
        found: list[tuple[Any, Any, tuple[_Token, ...]]] = []
        for tensor in self.heap_tensors:
            base = _base_of(tensor)
            if base is not None and id(base) in bases and base is bases[id(base)]:
                found.append((tensor, base, (("attr", "Tensor", "_base"),)))
        return found

    def _graph_sources(self, wanted: dict[int, Any]) -> tuple[list[tuple[Any, Any]], int]:
        """The heap's tensors with a graph as ``(tensor, grad_fn)``, and how many are roots.

        Roots (tensors whose ``grad_fn`` no other graph leads to) come first.
        """
        if self.heap_tensors is None:
            self.heap_tensors = _heap_tensors()
            self._own(self.heap_tensors)
        sources = [
            (tensor, tensor.grad_fn)
            for tensor in self.heap_tensors
            if id(tensor) not in wanted and tensor.grad_fn is not None
        ]
        self._own(sources)
        inner: set[int] = set()  # nodes that some other node leads to
        stack = [node for _, node in sources]
        visited: set[int] = set()
        while stack and len(visited) < _GRAPH_NODES:
            node = stack.pop()
            if id(node) in visited:
                continue
            visited.add(id(node))
            for child, _ in node.next_functions:
                if child is not None:
                    inner.add(id(child))
                    stack.append(child)
        stack.clear()
        sources.sort(key=lambda source: id(source[1]) in inner)
        return sources, sum(1 for _, node in sources if id(node) not in inner)

    def _graph_walk(
        self, wanted: dict[int, Any], storages: dict[int, Any]
    ) -> list[tuple[Any, Any, tuple[_Token, ...]]]:
        """Walk the graphs breadth-first for ``AccumulateGrad`` nodes holding wanted tensors.

        Graph roots are walked first, together: a node they share with an
        activation the graph saved is credited to the root (the output a
        person keeps), not to the activation.
        """
        sources, roots = self._graph_sources(wanted)
        parents: dict[int, tuple[int | None, Any, int]] = {}  # node -> (parent, node, source)
        self._own(parents)
        found: list[tuple[Any, Any, tuple[_Token, ...]]] = []
        matched: set[tuple[int, int]] = set()
        for start, stop in ((0, roots), (roots, len(sources))):
            queue = []
            for index in range(start, stop):
                node = sources[index][1]
                if id(node) not in parents:
                    parents[id(node)] = (None, node, index)
                    queue.append(node)
            position = 0
            while position < len(queue) and len(parents) < _GRAPH_NODES:
                node = queue[position]
                position += 1
                source = parents[id(node)][2]
                if type(node).__name__ == "AccumulateGrad":
                    held = _held_by(node.variable, wanted, storages)
                    if held is not None and (source, id(held)) not in matched:
                        matched.add((source, id(held)))
                        found.append((sources[source][0], held, _graph_tokens(parents, id(node))))
                    continue
                for child, _ in node.next_functions:
                    if child is not None and id(child) not in parents:
                        parents[id(child)] = (id(node), child, source)
                        queue.append(child)
            queue.clear()
        return found


def _held_by(variable: Any, wanted: dict[int, Any], storages: dict[int, Any]) -> Any:
    """The wanted tensor ``variable`` is, or shares its storage with (``None``: neither)."""
    held = wanted.get(id(variable))
    if held is None:
        key = _storage_key(variable)
        held = storages.get(key) if key is not None else None
    return held


# -------------------------------------------------------------------- edges and labels


def _edges(search: _Search, holder: Any, child: Any) -> list[tuple[tuple[_Token, ...], str | None]]:
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


def _key_text(key: object) -> str:
    kind = type(key)
    if kind in _SAFE_KEYS:
        text = repr(key)
        return text if len(text) <= 60 else text[:57] + "..."
    if kind is tuple:
        parts: list[Any] = list(tuple.__iter__(key))  # type: ignore[arg-type]
        if len(parts) <= 4 and all(type(p) in _SAFE_KEYS for p in parts):
            return repr(tuple(parts))
    return f"<{_name(kind)}>"


def _attribute_names(holder: object, child: object) -> list[str]:
    """Names under which ``holder`` keeps ``child``: instance dict entries, then slots."""
    names: list[str] = []
    attributes = _instance_dict(holder)
    if attributes is not None:
        names += [k for k, v in dict.items(attributes) if v is child and type(k) is str][:3]
    if names:
        return names
    for cls in _type_mro.__get__(type(holder)):
        for name, descriptor in dict.items(_class_namespace(cls)):
            if type(descriptor) is types.MemberDescriptorType and type(name) is str:
                try:
                    value = descriptor.__get__(holder, type(holder))
                except Exception:  # an empty slot raises AttributeError
                    continue
                if value is child:
                    names.append(name)
    return names[:3]


def _instance_dict(obj: object) -> dict[str, Any] | None:
    """``obj.__dict__`` through the type's own C accessor, or ``None`` when it has none."""
    for cls in _type_mro.__get__(type(obj)):
        descriptor = _lookup(_class_namespace(cls), "__dict__")
        if descriptor is None:
            continue
        if type(descriptor) is not types.GetSetDescriptorType:
            return None  # a Python-level __dict__ (property): not ours to call
        try:
            value = descriptor.__get__(obj, type(obj))
        except Exception:  # objects without a dict, or odd C types
            return None
        return value if type(value) is dict else None
    return None


def _lookup(namespace: dict[Any, Any], name: str) -> Any:
    """``namespace[name]`` without hashing or comparing foreign keys."""
    for key, value in dict.items(namespace):
        if type(key) is str and key == name:
            return value
    return None


def _class_namespace(cls: type) -> dict[str, Any]:
    """The dict behind ``cls.__dict__`` (a read-only proxy around it)."""
    proxy = _type_dict.__get__(cls)
    inner = gc.get_referents(proxy)
    return inner[0] if inner and type(inner[0]) is dict else {}


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
    search: _Search, frame: types.FrameType, child: object
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


def _graph_tokens(parents: dict[int, tuple[int | None, Any, int]], last: int) -> tuple[_Token, ...]:
    """``Tensor.grad_fn -> First -> ... -> AccumulateGrad.variable`` for the route to ``last``."""
    route = []
    current: int | None = last
    while current is not None:
        parent, node, _ = parents[current]
        route.append(_name(type(node)))
        current = parent
    route.reverse()
    middle = route[:-1]
    if len(middle) > 1:
        middle = [middle[0], "..."]
    steps = [("attr", "Tensor", "grad_fn"), *(("text", n, "") for n in middle)]
    return (*steps, ("attr", "AccumulateGrad", "variable"))


def _name(cls: type) -> str:
    return str(_type_name.__get__(cls))


def _qualified(cls: type) -> str:
    return f"{_type_module.__get__(cls)}.{_type_qualname.__get__(cls)}"


# ----------------------------------------------------------------------- rendering


def _render(tokens: Iterable[_Token]) -> tuple[str, ...]:
    """Readable steps, root first: dict and index steps glue to what holds them."""
    merged = _merge(list(tokens))
    steps: list[str] = []
    for kind, text, extra in merged:
        if kind in ("key", "index", "set", "cell") and steps:
            steps[-1] += {"key": f"[{text}]", "index": f"[{text}]", "set": "{...}", "cell": ""}[
                kind
            ]
        elif kind in ("key", "index"):
            steps.append(f"[{text}]")
        elif kind == "attr":
            steps.append(f"{text}.{extra}")
        elif kind == "closure":
            steps.append(f"closure of {text}")
        elif kind in ("module", "class", "text"):
            steps.append(text)
        # a lone set or cell step carries no text of its own
    return tuple(steps)


def _merge(tokens: list[_Token]) -> list[_Token]:
    """Fold steps that read better together.

    ``Linear.__dict__['_parameters']['weight']`` becomes ``Linear.weight``,
    ``module`` + ``'name'`` becomes ``pkg.mod.name``, and a closure tuple's
    index and cell become the variable's name.
    """
    out: list[_Token] = []
    for token in tokens:
        kind, _, extra = token
        if out and kind == "key" and extra:
            last_kind, last_text, last_extra = out[-1]
            if last_kind in ("module", "class"):
                out[-1] = ("text", f"{last_text}.{extra}", "")
                continue
            if last_kind == "attr" and (
                last_extra in _MODULE_INTERNALS or last_extra == "__dict__"
            ):
                out[-1] = ("attr", last_text, extra)
                continue
        if out and kind == "cell" and len(out) >= 2:
            closure, index = out[-2], out[-1]
            if closure[0] == "closure" and index[0] == "index":
                names = closure[2].split()
                position = int(index[1])
                variable = names[position] if position < len(names) else "?"
                out[-2:] = [("text", f"closure of {closure[1]} (variable {variable!r})", "")]
                continue
        out.append(token)
    return out


def _partial(path: _Path) -> ReferrerChain:
    return ReferrerChain("unknown", ("...", *_render(path.tokens)))


def _best(chains: list[tuple[int, ReferrerChain]], limit: int) -> list[ReferrerChain]:
    unique: dict[tuple[str, ...], tuple[int, ReferrerChain]] = {}
    for target, chain in chains:
        known = unique.get(chain.steps)
        if known is None or target < known[0]:
            unique[chain.steps] = (target, chain)
    ordered = sorted(
        unique.values(),
        key=lambda item: (
            _ROOT_ORDER.get(item[1].root, 9),
            item[0],
            len(item[1].steps),
            str(item[1]),
        ),
    )
    return [chain for _, chain in ordered[:limit]]


def _narrow(paths: list[_Path]) -> list[_Path]:
    """The next level: sorted by what it reads like, cut to the width (ties kept whole)."""
    paths.sort(key=lambda p: (p.target, len(p.tokens), p.text))
    if len(paths) <= _WIDTH:
        return paths
    edge = (paths[_WIDTH - 1].target, paths[_WIDTH - 1].text)
    cut = _WIDTH
    while cut < min(len(paths), 4 * _WIDTH) and (paths[cut].target, paths[cut].text) == edge:
        cut += 1
    return paths[:cut]


# ------------------------------------------------------------------------ the heap


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


def _is_vramkit(code: types.CodeType) -> bool:
    return code.co_filename.startswith(_PACKAGE_DIR)


def _where(frame: types.FrameType) -> str:
    code = frame.f_code
    name = getattr(code, "co_qualname", code.co_name)  # co_qualname: Python 3.11+
    return f"{name}() in {os.path.basename(code.co_filename)}:{frame.f_lineno}"


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


def _locals(frame: types.FrameType) -> list[tuple[str, Any]]:
    """A frame's local variables."""
    return _items(frame.f_locals)


def _items(scope: Any) -> list[tuple[str, Any]]:
    """Entries of ``f_locals``: a dict before Python 3.13, a C-level proxy since."""
    items = dict.items(scope) if type(scope) is dict else scope.items()
    return [(name, value) for name, value in items if type(name) is str]


def _handled_exception() -> BaseException | None:
    return sys.exc_info()[1]


def _heap_tensors() -> list[Any]:
    return tensors_in_heap()


def _is_grad_leaf(tensor: Any) -> bool:
    # Caller has disabled __torch_function__: these read the C++ tensor directly.
    try:
        return bool(tensor.requires_grad and tensor.grad_fn is None)
    except Exception:  # tensors without autograd metadata
        return False


def _base_of(tensor: Any) -> Any:
    # Caller has disabled __torch_function__.
    try:
        return tensor._base
    except Exception:  # tensor subclasses without view metadata
        return None


def _storage_key(tensor: Any) -> int | None:
    try:
        return int(tensor.untyped_storage()._cdata)
    except Exception:  # storage-less tensor subclasses, meta wrappers
        return None
