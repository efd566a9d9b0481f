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
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["exclusive", "tensors_in_heap"]

_lock = threading.Lock()
_walkers = 0
_saved_interval = 0.005
_gc_was_enabled = True
_refreeze = False


@contextlib.contextmanager
def exclusive() -> Iterator[None]:
    """Hold off other Python threads for the duration of a heap walk.

    Reentrant and safe across threads: the switch interval is raised by the
    first walker in and restored by the last one out. Automatic garbage
    collection is paused too, because a finalizer it runs could block on a
    lock and let another thread run while the walk holds its objects. The
    walk itself must not take locks or do I/O.
    """
    global _walkers, _saved_interval, _gc_was_enabled, _refreeze
    with _lock:
        if _walkers == 0:
            _saved_interval = sys.getswitchinterval()
            sys.setswitchinterval(max(_saved_interval, 10.0))
            _gc_was_enabled = gc.isenabled()
            gc.disable()
            # Frozen objects are invisible to gc.get_referrers and gc.get_objects, and
            # servers freeze after startup (every Ray Serve 2.60 replica does): the
            # deployment holding a stray model reference would hide. Thaw for the walk.
            # Freezing again also takes in what was allocated since: those objects are
            # still freed by reference counting, only cycles among them never collected.
            _refreeze = gc.get_freeze_count() > 0
            if _refreeze:
                gc.unfreeze()
        _walkers += 1
    try:
        yield
    finally:
        with _lock:
            _walkers -= 1
            if _walkers == 0:
                if _refreeze:
                    gc.freeze()
                if _gc_was_enabled:
                    gc.enable()
                sys.setswitchinterval(_saved_interval)


def tensors_in_heap() -> list[torch.Tensor]:
    """Every tensor the garbage collector tracks, subclasses (``Parameter``) included.

    Found as the referrers of the tensor classes (every instance of a Python
    class refers to its class), not by walking ``gc.get_objects()``: that list
    would hold every object in the heap, including tuples other threads are
    still filling, and a thread resuming while it is held fails with
    ``SystemError`` (see :mod:`vramkit._gc`). It is also several times faster.
    """
    import torch

    classes = _tensor_classes(torch.Tensor)
    with exclusive():
        holders = gc.get_referrers(*classes)
        try:
            # type() and issubclass(), not isinstance(): isinstance reads
            # obj.__class__, which some proxies answer with a warning.
            return [h for h in holders if issubclass(type(h), torch.Tensor)]
        finally:
            holders.clear()


def _tensor_classes(base: type) -> list[type]:
    found: list[type] = []
    stack: list[type] = [base]
    seen: set[int] = set()
    while stack:
        cls = stack.pop()
        if id(cls) in seen:
            continue
        seen.add(id(cls))
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return found
