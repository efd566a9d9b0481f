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

import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

from vramkit._gc import exclusive
from vramkit._units import check_flag, parse_timeout
from vramkit.errors import InvalidArgumentError
from vramkit.referrers._chain import ReferrerChain, _best
from vramkit.referrers._walk import _Search

__all__ = ["ReferrerChain", "find_holders", "find_holders_each", "find_referrers"]


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
    heap_tensors: list[Any] | None = None,
) -> list[list[ReferrerChain]]:
    """The chains of each of ``targets`` (same order), found in one shared search.

    Arguments as for :func:`find_holders`; ``max_chains`` applies per target,
    and the walk stops at the level where every target has a chain from a root.
    """
    limit = _check_search(targets, max_depth, max_chains, max_objects, seconds, ignore)
    enough = max_chains * len(targets)
    pairs = _search(
        targets, max_depth, enough, max_objects, limit, ignore, None, heap_tensors, first_only=True
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
