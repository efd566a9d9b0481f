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

A leak-checked block freezes the heap for its own duration (a
:class:`Boundary`): what is alive when it begins is frozen, so the walk of
what is not frozen, when it ends, finds exactly what the block made, at the
cost of what the block made rather than of the whole heap. Freezing and
thawing are constant-time list splices. While the boundary holds, the
collector's own passes skip the objects from before the block; vramkit's
full collections (:func:`collect`) and heap walks thaw around themselves and
freeze again, remembering weakly what the block made so far, so the boundary
survives them. A ``gc.freeze()`` or ``gc.unfreeze()`` by anyone else breaks it,
and the blocks it covers say they could not tell what they made.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import sysconfig
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = [
    "Boundary",
    "collect",
    "enter_boundary",
    "exclusive",
    "freeze",
    "leave_boundary",
    "tensor_classes",
    "tensors_in_heap",
    "tensors_since",
]

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


@dataclass(slots=True, eq=False)
class Boundary:
    """The heap frozen when the first leak-checked block began, thawed when the last one ends.

    Attributes:
        before: Made just before the freeze: frozen while nobody thawed since.
        after: Made just after the latest freeze (vramkit's own included): not
            frozen while nobody froze since.
        carried: What the blocks made that a freeze of vramkit's own took in
            (a holder search, a full collection), held weakly.
        users: The blocks inside the boundary now.
        broken: Someone else froze or thawed the heap since: a walk of what is
            not frozen is no longer what the blocks made.
        keep: :func:`freeze` ran inside: the heap stays frozen when the last
            block ends.
    """

    before: _Mark
    after: _Mark
    carried: list[weakref.ReferenceType[Any]]
    users: int = 1
    broken: bool = False
    keep: bool = False


_boundary_lock = threading.RLock()  # entering, leaving, reading and thawing a boundary
_current: Boundary | None = None
_thawing = 0  # vramkit's collections under way: the boundary's heap is not frozen meanwhile
_thawed_out = threading.Condition(_boundary_lock)  # notified when a collection freezes again
THAW_WAIT_SECONDS = 30.0
"""How long a block's census waits for a collection in another thread to freeze the heap again.

Past it the block walks the whole heap (on entry) or says it could not tell
(on exit): a finalizer that waits for the very thread that waits here stalls
it this long, instead of for ever.
"""
# A build without the GIL keeps no generations to freeze: a walk of what is
# not frozen would be the whole heap, so blocks walk it without a boundary.
_FREEZES = not sysconfig.get_config_var("Py_GIL_DISABLED")


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
    # Whether to thaw is decided, and the thaw undone, under the boundary's
    # lock: a block leaving meanwhile would thaw the heap for good, and this
    # walk would freeze it again for good. Taken before the walk holds anything.
    with _boundary_lock if thaw else contextlib.nullcontext(), _walking(thaw=thaw):
        yield


@contextlib.contextmanager
def _walking(*, thaw: bool) -> Iterator[None]:
    """The body of :func:`exclusive`."""
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
    refreeze = thaw and _frozen_now()
    carried: list[weakref.ReferenceType[Any]] | None = None
    thawed: contextlib.AbstractContextManager[None] = (
        _refrozen() if refreeze else contextlib.nullcontext()
    )
    if refreeze:
        carried = _carry()
    try:
        with thawed:
            yield
    finally:
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
    with _boundary_lock, exclusive(thaw=False):
        return _tensors(_tensor_kinds())


def freeze() -> None:
    """``gc.freeze()``, keeping what the census remembers of the frozen heap current.

    Costs a walk of what was made since the last freeze, not of the whole heap.
    """
    with _boundary_lock, exclusive(thaw=False):
        found = _tensors(_tensor_kinds())
        boundary = _current
        if boundary is None or boundary.broken:
            gc.freeze()
        else:  # inside a leak-checked block: keep its record, and stay frozen after it
            with _refrozen():
                pass
            boundary.keep = True
        _remember(found)
        found.clear()


def collect(generation: int = 2) -> int:
    """``gc.collect(generation)``; a full one also collects what a :class:`Boundary` froze.

    Inside a leak-checked block the objects from before it are frozen, and
    ``gc.collect()`` alone skips them: a model loaded before the block and
    dropped in it would keep its cycles until the block ends. This thaws,
    collects, and freezes again, remembering weakly what the blocks made so
    far (a walk of that only). Young collections never reach frozen objects
    anyway.

    Returns:
        What ``gc.collect`` returns: the unreachable objects found.
    """
    global _thawing
    if generation < 2 or _current is None:
        return gc.collect(generation)
    with _boundary_lock:
        boundary = _current
        thawed = False
        if boundary is not None and not boundary.broken and not _thawing:
            with exclusive(thaw=False):
                thawed = _carry_boundary(boundary, _tensor_kinds())
                if thawed:
                    gc.unfreeze()
                    _thawing += 1
    if not thawed:  # no boundary, a broken one, or thawed by a collection under way
        return gc.collect(generation)
    try:
        # Without the lock (finalizers run here, and may wait on threads that
        # wait for it), but without thread switches either: what other
        # threads make while the heap is thawed would be frozen unremembered.
        # A finalizer that blocks still lets them run.
        with exclusive(thaw=False):
            return gc.collect()
    finally:
        with _boundary_lock:
            _thawing -= 1
            # The last block may have left meanwhile: then nothing is to be frozen.
            if _current is boundary and not boundary.broken:
                gc.freeze()
                boundary.after = _Mark()
            _thawed_out.notify_all()


def enter_boundary() -> Boundary | None:
    """Freeze the heap for a leak-checked block, or join the boundary already set.

    Returns:
        The boundary the block is inside, to pass to :func:`tensors_since` and
        :func:`leave_boundary`; ``None`` where the heap was frozen already
        (``gc.freeze()``, :func:`vramkit.freeze_heap`: the census walks what was
        made since that freeze instead) or a boundary is broken.
    """
    global _current
    if not _FREEZES:
        return None
    with _boundary_lock:
        if not _frozen_again():  # a collection has the heap thawed: this block walks it all
            return None
        boundary = _current
        if boundary is not None:
            if boundary.broken:
                return None
            boundary.users += 1
            return boundary
        # Counting frozen objects walks them (tens of milliseconds on a large
        # heap), but takes constant time when there are none; frozen by
        # vramkit, the record says so.
        if _frozen is not None or gc.get_freeze_count():
            return None
        before = _Mark()
        gc.freeze()
        boundary = _current = Boundary(before, _Mark(), [])
        return boundary


def leave_boundary(boundary: Boundary) -> None:
    """End one block's part in ``boundary``; the last one out thaws the heap.

    A heap frozen by :func:`freeze` inside stays frozen, and so does a broken
    boundary: whoever froze since owns the freeze now.
    """
    global _current
    with _boundary_lock:
        boundary.users -= 1
        if boundary.users > 0 or _current is not boundary:
            return
        _current = None
        boundary.carried = []
        if not boundary.keep and not boundary.broken:
            gc.unfreeze()
            _forget()  # a record of the heap the boundary froze: nothing is frozen now


def tensors_since(boundary: Boundary | None) -> list[torch.Tensor] | None:
    """The live tensors made since ``boundary`` began; every tensor without one.

    Returns:
        The tensors (one walk of what is not frozen, plus what a refreeze took
        in); ``None`` when the boundary is broken.
    """
    if boundary is None:
        return tensors_in_heap()
    with _boundary_lock:
        _frozen_again()
        with exclusive(thaw=False):
            return _since(boundary, _tensor_kinds())


def _frozen_again() -> bool:
    """Wait (holding the lock) for vramkit's collections in other threads to freeze again.

    Returns:
        Whether none is under way any more (``False`` after
        :data:`THAW_WAIT_SECONDS`).
    """
    return _thawed_out.wait_for(lambda: not _thawing, timeout=THAW_WAIT_SECONDS)


def _tensors(kinds: frozenset[type]) -> list[Any]:
    """The body of :func:`tensors_in_heap`. Call inside :func:`exclusive`, holding the lock."""
    known = _frozen
    if known is None:
        # Counting the frozen objects walks them: asked only when nothing is known.
        return _walk_frozen(kinds) if _frozen_now() else _instances(kinds)
    found = _instances(kinds | {_Mark})
    if not any(h is known.mark for h in found):  # frozen since: the record is stale
        found.clear()
        return _walk_frozen(kinds)
    unique = {id(h): h for h in found if type(h) is not _Mark}
    found.clear()
    thawed = False
    for ref in known.refs:
        tensor = ref()
        if tensor is not None:
            # Found by the walk: thawed since (gc.unfreeze()).
            thawed = thawed or id(tensor) in unique
            unique[id(tensor)] = tensor
    if thawed and not _frozen_now():
        _forget()  # nothing frozen is left to remember: a leak check may freeze again
    return list(unique.values())


def _frozen_now() -> bool:
    """Whether any object is frozen: known inside an intact boundary, else counted.

    Counting walks the frozen objects, tens of milliseconds on a large heap.
    """
    boundary = _current
    if boundary is not None and not boundary.broken and not _thawing:
        return True
    return gc.get_freeze_count() > 0  # constant time when nothing is frozen


def _forget() -> None:
    global _frozen
    _frozen = None


def thaw() -> None:
    """``gc.unfreeze()``, and forget what the census remembered of the frozen heap."""
    with _boundary_lock, exclusive(thaw=False):
        gc.unfreeze()
        _forget()


def _tensor_kinds() -> frozenset[type]:
    """``torch.Tensor`` and every class derived from it (torch is imported here, lazily)."""
    import torch

    return tensor_classes(torch.Tensor)


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
    with _refrozen():
        found = _instances(kinds)
    _remember(found)
    return found


@contextlib.contextmanager
def _refrozen() -> Iterator[None]:
    """Thaw for the body, then freeze again, keeping what the boundary's blocks made.

    Call inside :func:`exclusive` on a frozen heap, holding ``_boundary_lock``
    since deciding that it is frozen.
    """
    global _thawing
    boundary = _current
    if boundary is not None and not boundary.broken:
        _carry_boundary(boundary, _tensor_kinds())
    gc.unfreeze()
    _thawing += 1
    try:
        yield
    finally:
        _thawing -= 1
        gc.freeze()
        if boundary is not None and not boundary.broken:
            boundary.after = _Mark()


def _since(boundary: Boundary, kinds: frozenset[type]) -> list[Any] | None:
    """What the boundary's blocks made and is alive; ``None`` once it is broken.

    Call inside :func:`exclusive`.
    """
    if boundary.broken:
        return None
    if _thawing:  # a collection in another thread has it thawed: no telling now
        return None
    found = _instances(kinds | {_Mark})
    try:
        if not any(h is boundary.after for h in found) or any(h is boundary.before for h in found):
            boundary.broken = True
            return None
        unique = {id(h): h for h in found if type(h) is not _Mark}
    finally:
        found.clear()
    for ref in boundary.carried:
        tensor = ref()
        if tensor is not None:
            unique[id(tensor)] = tensor
    return list(unique.values())


def _carry_boundary(boundary: Boundary, kinds: frozenset[type]) -> bool:
    """Remember weakly what the blocks made, before a freeze takes it in.

    Call inside :func:`exclusive`.

    Returns:
        Whether the boundary still holds.
    """
    made = _since(boundary, kinds)
    if made is None:
        return False
    try:
        boundary.carried = [weakref.ref(t) for t in made]
    except TypeError:  # a tensor class without weak references: it could not be found again
        boundary.broken = True
    finally:
        made.clear()
    return not boundary.broken


def _carry() -> list[weakref.ReferenceType[Any]] | None:
    """Every tensor, held weakly, when the census knows the frozen heap: cheap then.

    Weakly, so that the walk about to run does not find this list among the
    holders of the tensor it searches for.
    """
    if _frozen is None:
        return None
    found = _tensors(_tensor_kinds())
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
