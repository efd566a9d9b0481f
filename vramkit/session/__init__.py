"""Measure a block of work and check that the memory it used came back.

>>> from vramkit.session import gpu_session
>>> with gpu_session("cpu", leak_check=None, cleanup=False) as s:
...     pass
>>> s.report.verdict
'unchecked'

:func:`gpu_session` returns a :class:`GpuSession`: a context manager, an async
context manager and a decorator (bare ``@gpu_session`` or with arguments, on
sync and ``async`` functions). Each entry gets its own :class:`SessionRun`, so
one session object may be used from several threads, nested, or by concurrent
tasks; its :class:`SessionReport` is filled when the block ends.

How a leak is judged, after PyTorch's ``CudaMemoryLeakCheck``:

- **Allocator layer**: on an accelerator, torch's ``allocated_bytes``; on the
  host (where torch keeps no counters), the bytes of CPU tensor storages that
  appeared during the block and are still alive (a census of the heap).
- **Driver layer**: this process as the driver sees it (NVML per-process
  usage, else the device's used bytes); on the host, the resident set size.
- A growth of the allocator layer beyond ``tolerance`` is re-checked after
  ``gc.collect()``, cuBLAS workspace release and ``empty_cache`` (and up to
  ``retries`` more times, with a short pause), then judged: on an accelerator
  it is a leak when the driver confirms it and ``"unverified"`` (a warning,
  never an error) when it does not; on the host it is a leak (pages of a
  leaked ``torch.empty`` that were never touched do not show in RSS, and are
  a leak all the same). Growth of the driver layer alone is ignored (contexts,
  kernels and arenas grow for good reasons) unless ``process_tolerance`` is set.
- The census walks what the block made: a leak-checked block freezes the heap
  while it runs (``gc.freeze()``, thawed when it ends; see
  :class:`vramkit._gc.Boundary`), so its cost follows the block, not the heap.

The package, room by room: ``_report`` (:class:`SessionReport`, its verdicts
and text), ``_session`` (:class:`GpuSession` and its entries, :class:`SessionRun`)
and ``_leak`` (the census baseline, the re-checks and the verdict).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar, overload

from vramkit.devices import Device, DeviceLike
from vramkit.errors import VramLeakWarning
from vramkit.session._report import HeldTensor, LeakCheck, SessionReport, Verdict
from vramkit.session._session import GpuSession, SessionDecorated, SessionRun

__all__ = [
    "GpuSession",
    "HeldTensor",
    "LeakCheck",
    "SessionDecorated",
    "SessionReport",
    "SessionRun",
    "Verdict",
    "VramLeakWarning",
    "gpu_session",
]

P = ParamSpec("P")
R = TypeVar("R")

# VramLeakWarning lives in vramkit.errors (torch-free, so warning filters naming it
# do not import torch); re-exported here where it is issued.


@overload
def gpu_session(device: Callable[P, R], /) -> SessionDecorated[P, R]: ...
@overload
def gpu_session(
    device: DeviceLike | None = None,
    *,
    leak_check: LeakCheck | None = "raise",
    tolerance: int | float | str = "16MiB",
    cleanup: bool = True,
    retries: int = 3,
    process_tolerance: int | float | str | None = None,
    name: str | None = None,
) -> GpuSession: ...
def gpu_session(
    device: DeviceLike | Callable[..., Any] | None = None,
    *,
    leak_check: LeakCheck | None = "raise",
    tolerance: int | float | str = "16MiB",
    cleanup: bool = True,
    retries: int = 3,
    process_tolerance: int | float | str | None = None,
    name: str | None = None,
) -> GpuSession | SessionDecorated[..., Any]:
    """Measure a block (or each call of a function) and check that its memory came back.

    Use it as ``with gpu_session() as s:``, ``async with``, ``@gpu_session`` or
    ``@gpu_session(...)``. After the block, ``s.report`` holds a
    :class:`SessionReport`; a decorated function's latest report is
    ``f.session.last_report``.

    Args:
        device: The device to watch: ``None`` for the default device (the first
            accelerator, else ``cpu``), or a name such as ``"cuda:1"``. A
            function here means bare ``@gpu_session`` use.
        leak_check: ``"raise"`` raises :class:`~vramkit.errors.VramLeakError`
            on a leak, ``"warn"`` issues a :class:`VramLeakWarning`, ``None``
            only measures (no census, no judgement: the cheap setting).
        tolerance: Allocator growth allowed before it counts as a leak, in
            bytes or a string such as ``"16MiB"``.
        cleanup: Run :func:`vramkit.cleanup` on the device when the block ends
            (``gc`` of the young generations, ``empty_cache``, heap trim: well
            under a millisecond on the host, whatever the heap's size). A leak
            check re-checks suspected growth after a full collection, with
            ``cleanup`` on or off.
        retries: Extra re-checks (``gc`` and a short pause each) before a
            suspected leak is reported.
        process_tolerance: When set, growth of the process as the driver (or
            OS) sees it beyond this also counts as a leak; otherwise such
            growth alone is ignored.
        name: A label for reports; a decorated function's qualified name by default.

    Returns:
        A :class:`GpuSession`, or with bare ``@gpu_session`` the wrapped function.

    Raises:
        InvalidArgumentError: A setting of the wrong type or value, such as
            ``leak_check="maybe"``, ``tolerance="ten"`` or ``retries=-1``.
        DeviceUnavailableError: A device this machine lacks.

    Example:
        >>> import torch
        >>> with gpu_session("cpu", tolerance="1MiB") as s:
        ...     scratch = torch.ones(1024, 1024)
        ...     del scratch
        >>> s.report.verdict
        'clean'
    """
    function = None
    if callable(device) and not isinstance(device, str | int | Device):
        function, device = device, None
    session = GpuSession(
        device,
        leak_check=leak_check,
        tolerance=tolerance,
        cleanup=cleanup,
        retries=retries,
        process_tolerance=process_tolerance,
        name=name,
    )
    return session if function is None else session(function)
