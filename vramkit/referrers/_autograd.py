"""Holders the gc cannot see, read from the heap's tensors: a view's base, a graph's weights.

A view keeps its base in C++, and an autograd graph keeps its weights in
``AccumulateGrad`` nodes; the heap's tensors (and their graphs) are walked
instead, breadth-first and bounded by the nodes visited.
"""

from __future__ import annotations

import sys
from typing import Any

from vramkit.referrers._chain import _Token
from vramkit.referrers._read import _name
from vramkit.referrers._roots import _heap_tensors

_GRAPH_NODES = 20_000  # autograd nodes visited per search


class _GraphEdges:
    """The autograd half of a search: edges from live tensors to the frontier's tensors.

    Mixed into the search, which keeps what is read here alive until it ends.
    """

    heap_tensors: list[Any] | None

    def _own(self, container: Any) -> None:
        raise NotImplementedError  # the search's own: it marks a container as never a holder

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
