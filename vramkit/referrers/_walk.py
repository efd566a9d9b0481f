"""The walk: level by level from the targets back towards roots, one heap scan per level.

Each level asks ``gc.get_referrers`` for the holders of the whole frontier at
once, turns each holder into steps (or a root), climbs ``nn.Module`` trees
without scanning, and cuts the next level to a fixed width sorted by text, so
the same heap gives the same chains in the same order.
"""

from __future__ import annotations

import gc
import sys
import time
import types
from collections.abc import Iterable, Sequence
from typing import Any

from vramkit.referrers._autograd import _GraphEdges
from vramkit.referrers._chain import ReferrerChain, _narrow, _partial, _Path, _render, _Token
from vramkit.referrers._read import _is_vramkit, _name
from vramkit.referrers._roots import (
    _handled_exception,
    _module_dicts,
    _module_index,
    _running_frames,
)
from vramkit.referrers._steps import _SUSPENDABLE, _edges, _suspended_code

_LEVEL_HOLDERS = 50_000  # holders of one level beyond which the walk gives up
_CONTAINERS = (list, tuple, dict, set, frozenset)


class _Search(_GraphEdges):
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
