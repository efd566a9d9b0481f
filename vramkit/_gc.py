"""Walking the garbage collector's view of the heap without breaking other threads.

``gc.get_objects()`` and ``gc.get_referrers()`` hand out objects that other
threads may still be building: CPython fills a tuple from a generator and then
resizes it, which requires that nothing else holds it. If a heap walk holds
such a tuple when its thread resumes, that thread fails with ``SystemError:
bad argument to internal function``. So heap walks run inside
:func:`exclusive`, which keeps the GIL (no thread switch while the walk runs
Python code) and must drop every reference it took before it returns.

The heap walks themselves live here too (:func:`tensors_in_heap`), so the
census, the referrer search and the adapters that free survivors share one.
torch is imported only when a walk runs: ``import vramkit`` stays torch-free.

A frozen heap (``gc.freeze()``) is invisible to those walks. Its tensors are
found once, by thawing, and remembered weakly with a mark (an object made
just after the freeze, so unfrozen); while the mark is still unfrozen nobody
froze again, and a walk of what is not frozen plus the remembered tensors is
every tensor. That keeps a census on a frozen heap at the cost of what was
made since the freeze.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["exclusive", "freeze", "tensor_classes", "tensors_in_heap"]

_lock = threading.Lock()
_walkers = 0
_saved_interval = 0.005
_gc_was_enabled = True


class _Mark:
    """Made just after vramkit freezes the heap: while it is not frozen, nobody froze since.

    The freeze count cannot tell: frozen objects that die leave it, so it
    falls and a later freeze can bring it back to any value.
    """


@dataclass(frozen=True, slots=True)
class _FrozenTensors:
    """The tensors in the frozen generation, held weakly, and the mark that dates them."""

    mark: _Mark
    refs: tuple[weakref.ReferenceType[Any], ...]


_frozen: _FrozenTensors | None = None


@contextlib.contextmanager
def exclusive(*, thaw: bool = True) -> Iterator[None]:
    """Hold off other Python threads for the duration of a heap walk.

    Reentrant and safe across threads: the switch interval is raised by the
    first walker in and restored by the last one out. Automatic garbage
    collection is paused too, because a finalizer it runs could block on a
    lock and let another thread run while the walk holds its objects. The
    walk itself must not take locks or do I/O.

    Args:
        thaw: Make frozen objects visible for the walk (see below). A walk
            that knows the frozen part another way (the census:
            :func:`tensors_in_heap`) passes ``False``.

    Frozen objects are invisible to ``gc.get_referrers`` and ``gc.get_objects``,
    and servers freeze after startup (every Ray Serve 2.60 replica does): the
    deployment holding a stray model reference would hide. So by default the
    walk thaws, and freezes again when it ends. Freezing again also takes in
    what was allocated since: those objects are still freed by reference
    counting, only cycles among them are never collected. What the census
    remembers of the frozen heap is carried over, so a holder search does not
    cost the next census a walk of the whole heap.
    """
    global _walkers, _saved_interval, _gc_was_enabled
    with _lock:
        if _walkers == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(max(_saved_interval, 10.0))
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _walkers += 1
    # Inside the walk no other thread runs and collections are paused: the
    # freeze count read here is the one the walk sees.
    refreeze = thaw and gc.get_freeze_count() > 0
    carried: list[weakref.ReferenceType[Any]] | None = None
    if refreeze:
        carried = _carry()
        gc.unfreeze()
    try:
        yield
    finally:
        if refreeze:
            gc.freeze()
            if carried is not None:
                _remember(carried)
        with _lock:
            _walkers -= 1
            if _walkers == 0:
                if _gc_was_enabled:
                    gc.enable()
                sys.setswitchinterval(_saved_interval)


def tensors_in_heap() -> list[torch.Tensor]:
    """Every tensor the garbage collector tracks, subclasses (``Parameter``) included.

    One pass over the heap. Found as the referrers of the tensor classes
    (every instance of a Python class refers to its class), not by walking
    ``gc.get_objects()``: that list would hold every object in the heap,
    including tuples other threads are still filling, and a thread resuming
    while it is held fails with ``SystemError`` (see :mod:`vramkit._gc`). It is
    also several times faster.

    A frozen heap (``gc.freeze()``, or :func:`vramkit.freeze_heap`) is thawed
    and walked once: its tensors are remembered weakly, and later walks cover
    only what was allocated since, until someone freezes again. A tensor
    there that starts holding a new storage (``param.data = ...``) is still
    seen, since a census reads the storage from the tensor each time.
    """
    import torch

    with exclusive(thaw=False):
        return _tensors(tensor_classes(torch.Tensor))


def freeze() -> None:
    """``gc.freeze()``, keeping what the census remembers of the frozen heap current.

    Costs a walk of what was made since the last freeze, not of the whole heap.
    """
    import torch

    with exclusive(thaw=False):
        found = _tensors(tensor_classes(torch.Tensor))
        gc.freeze()
        _remember(found)
        found.clear()


def _tensors(kinds: frozenset[type]) -> list[Any]:
    """The body of :func:`tensors_in_heap`. Call inside :func:`exclusive`."""
    known = _frozen
    if known is None:
        # Counting the frozen objects walks them: asked only when nothing is known.
        return _walk_frozen(kinds) if gc.get_freeze_count() else _instances(kinds)
    found = _instances(kinds | {_Mark})
    if not any(h is known.mark for h in found):  # frozen since: the record is stale
        found.clear()
        return _walk_frozen(kinds)
    # Thawed since (gc.unfreeze()): the walk found the remembered ones too.
    unique = {id(h): h for h in found if type(h) is not _Mark}
    found.clear()
    for ref in known.refs:
        tensor = ref()
        if tensor is not None:
            unique[id(tensor)] = tensor
    return list(unique.values())


def tensor_classes(base: type) -> frozenset[type]:
    """``base`` and every class derived from it, as loaded now."""
    found: set[type] = set()
    stack: list[type] = [base]
    while stack:
        cls = stack.pop()
        if cls not in found:
            found.add(cls)
            stack.extend(type.__subclasses__(cls))
    return frozenset(found)


def _instances(kinds: frozenset[type]) -> list[Any]:
    """The instances of ``kinds`` the collector sees now. Call inside :func:`exclusive`."""
    holders = gc.get_referrers(*kinds)
    try:
        # type(), not isinstance(): isinstance reads obj.__class__, which some
        # proxies answer with a warning; a set lookup is also cheaper than the
        # metaclass's __instancecheck__.
        return [h for h in holders if type(h) in kinds]
    finally:
        holders.clear()


def _walk_frozen(kinds: frozenset[type]) -> list[Any]:
    """Thaw, find every tensor, freeze again, and remember what is frozen now.

    Call inside :func:`exclusive`: no other thread can freeze or thaw meanwhile.
    """
    gc.unfreeze()
    try:
        found = _instances(kinds)
    finally:
        gc.freeze()
    _remember(found)
    return found


def _carry() -> list[weakref.ReferenceType[Any]] | None:
    """Every tensor, held weakly, when the census knows the frozen heap: cheap then.

    Weakly, so that the walk about to run does not find this list among the
    holders of the tensor it searches for.
    """
    if _frozen is None:
        return None
    import torch  # imported already: the census that made the record needed it

    found = _tensors(tensor_classes(torch.Tensor))
    try:
        return [weakref.ref(t) for t in found]
    except TypeError:
        return None
    finally:
        found.clear()


def _remember(frozen: list[Any]) -> None:
    """Record ``frozen`` (tensors, or weak references to them) as the frozen heap's tensors.

    Call just after a freeze.
    """
    global _frozen
    try:
        refs = tuple(t if type(t) is weakref.ReferenceType else weakref.ref(t) for t in frozen)
    except TypeError:  # a tensor class without weak references: thaw at every census
        _frozen = None
    else:
        _frozen = _FrozenTensors(_Mark(), refs)  # made after the freeze: not frozen itself
