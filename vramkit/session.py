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
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Literal, ParamSpec, Protocol, TypeVar, cast, overload

from vramkit._units import check_flag, format_bytes, parse_bytes
from vramkit._utils import qualname, wrap_calls
from vramkit.cleaning import CleanupReport, cleanup
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError, ModelStateError, VramLeakError, VramLeakWarning
from vramkit.memory import (
    DeviceMemoryDelta,
    MemoryDelta,
    MemorySnapshot,
    driver_layer,
    layer_bytes,
    peak_bytes,
    snapshot,
    usage_layer,
)
from vramkit.referrers import find_holders_each
from vramkit.tensors import TensorCensus, TensorInfo, live_tensors

if TYPE_CHECKING:
    from vramkit.devices import DeviceMemory
    from vramkit.referrers import ReferrerChain

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
R_co = TypeVar("R_co", covariant=True)

LeakCheck = Literal["raise", "warn"]
"""What a failed leak check does: raise :class:`~vramkit.errors.VramLeakError` or warn."""

Verdict = Literal["clean", "leak", "unverified", "unchecked"]
"""``"clean"``; ``"leak"``; ``"unverified"`` (the allocator grew, the driver does
not confirm it); ``"unchecked"`` (``leak_check=None``: numbers only, no judgement)."""

_LEAK_CHECKS: Final = ("raise", "warn", None)
_HINTED: Final = 3  # referrer searches walk the heap: only for the largest few
_LISTED: Final = 10  # tensors listed in a leak message
_PAUSE_SECONDS: Final = 0.01  # between re-checks; grows with each attempt
_YOUNG: Final = 1  # gc generations 0 and 1: what was made since the last collections
_log = logging.getLogger("vramkit")


# VramLeakWarning lives in vramkit.errors (torch-free, so warning filters naming it
# do not import torch); re-exported here where it is issued.


@dataclass(frozen=True, slots=True)
class HeldTensor:
    """A tensor that appeared during a session and is still alive, with who holds it.

    Attributes:
        tensor: The census entry (shape, dtype, device, bytes; a weak reference only).
        referrers: Chains from a root (module global, running frame...) down to
            the tensor, such as ``app.cache[0]``; empty when none was found.
    """

    tensor: TensorInfo
    referrers: tuple[ReferrerChain, ...]

    def describe(self) -> str:
        """The tensor's line followed by ``held by ...`` lines."""
        lines = [self.tensor.describe()]
        lines.extend(f"  held by {chain}" for chain in self.referrers)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SessionReport:
    """What a session saw. Bytes everywhere; ``None`` where a layer cannot be read here.

    Attributes:
        device: The device checked, such as ``"cuda:0"`` or ``"cpu"``.
        name: The session's name (a decorated function's qualified name by default).
        before: Snapshot of the device just before the block.
        after: Snapshot after the block and after any cleanup or re-check:
            what the verdict is based on.
        peak_bytes: Highest allocator reading during the block on an
            accelerator (``peak_allocated_bytes``), highest resident set size
            on the host (``process_peak_bytes``).
        cleanup: The first cleanup run on exit (``cleanup=True``: young
            generations; or a re-check of a suspected leak: a full collection),
            else ``None``.
        new_tensors: Storages on the device that appeared during the block and
            are still alive, largest first; ``None`` when no census was taken
            (``leak_check=None``).
        held: The largest few of ``new_tensors`` with their holders, searched
            only when the verdict is not ``"clean"`` and the block did not raise.
        allocator_growth_bytes: Growth of the allocator layer: ``allocated_bytes``
            on an accelerator, bytes of ``new_tensors`` on the host.
        driver_growth_bytes: Growth of this process as the driver (or the OS)
            sees it, else of the device's used bytes.
        leaked_bytes: Bytes that did not come back in the layer that decided
            the verdict (at least 0); ``None`` when unchecked.
        verdict: ``"clean"``, ``"leak"``, ``"unverified"`` or ``"unchecked"``.
        leak_check: The session's ``leak_check`` setting.
        tolerance_bytes: Allowed allocator growth.
        process_tolerance_bytes: Allowed driver growth, or ``None`` (ignored).
        checks: How many times memory was measured on exit (1 + re-checks).
        seconds: Wall time of the block itself.
        raised: ``"TypeName: message"`` when the block raised, else ``None``.
    """

    device: str
    name: str | None
    before: MemorySnapshot
    after: MemorySnapshot
    peak_bytes: int | None
    cleanup: CleanupReport | None
    new_tensors: TensorCensus | None
    held: tuple[HeldTensor, ...]
    allocator_growth_bytes: int | None
    driver_growth_bytes: int | None
    leaked_bytes: int | None
    verdict: Verdict
    leak_check: LeakCheck | None
    tolerance_bytes: int
    process_tolerance_bytes: int | None
    checks: int
    seconds: float
    raised: str | None

    @property
    def delta(self) -> MemoryDelta:
        """``after - before``: what the block left behind, per field."""
        return self.after - self.before

    def message(self) -> str:
        """The readable account used in errors and warnings.

        Returns:
            :meth:`headline` (after the session's name, when it has one) and,
            for a leak or an unverified verdict, :meth:`tensor_lines`.
        """
        prefix = f"{self.name}: " if self.name else ""
        lines = [prefix + self.headline()]
        if self.verdict in ("leak", "unverified") and self.new_tensors is not None:
            lines.extend(self.tensor_lines())
        return "\n".join(lines)

    def headline(self) -> str:
        """The verdict in one line, layer by layer, with the tolerances.

        Returns:
            Such as ``leaked 32.0 MiB on cpu (live tensors +32.0 MiB, process
            +1.2 MiB, peak 225.1 MiB); tolerance 16.0 MiB``. The allocator
            layer is ``allocated`` on an accelerator and ``live tensors`` on the
            host; the driver layer is named as :data:`vramkit.memory.LAYERS` names it.
        """
        layers = self._layers()
        if self.verdict == "leak":
            head = f"leaked {format_bytes(self.leaked_bytes)} on {self.device} ({layers})"
        elif self.verdict == "unverified":
            head = (
                f"{format_bytes(self.allocator_growth_bytes)} allocated on {self.device} "
                f"did not come back, but the driver does not confirm it ({layers}); "
                "this may be the allocator's bookkeeping rather than a leak"
            )
        else:
            head = f"{self.verdict} on {self.device} ({layers})"
        tolerances = f"tolerance {format_bytes(self.tolerance_bytes)}"
        if self.process_tolerance_bytes is not None:
            tolerances += f", process tolerance {format_bytes(self.process_tolerance_bytes)}"
        return f"{head}; {tolerances}"

    def _layers(self) -> str:
        change = self.delta[self.device]
        parts = []
        if self.allocator_growth_bytes is not None:
            label = "allocated" if usage_layer(change) == "allocated" else "live tensors"
            parts.append(f"{label} {format_bytes(self.allocator_growth_bytes, signed=True)}")
        if change.reserved_bytes is not None:
            parts.append(f"reserved {format_bytes(change.reserved_bytes, signed=True)}")
        if self.driver_growth_bytes is not None:
            label = driver_layer(change) or "driver"
            parts.append(f"{label} {format_bytes(self.driver_growth_bytes, signed=True)}")
        if self.peak_bytes is not None:
            parts.append(f"peak {format_bytes(self.peak_bytes)}")
        return ", ".join(parts) or "no comparable readings"

    def tensor_lines(self) -> list[str]:
        """The tensors that appeared and are still alive, largest first, with their holders.

        Returns:
            Indented lines: each tensor (the largest ten), then ``held by``
            lines where a holder was searched for and found; one line saying
            none were found when the census is empty; nothing without a census.
        """
        census = self.new_tensors
        if census is None:
            return []
        if not census:
            return [
                f"  no new live tensors on {self.device}: the memory is held outside "
                "Python-visible tensors (an extension's allocation, an autograd graph)"
            ]
        hinted = {h.tensor.storage_key: h for h in self.held}
        lines: list[str] = []
        for info in census[:_LISTED]:
            held = hinted.get(info.storage_key)
            lines.extend(
                "  " + line for line in (held or HeldTensor(info, ())).describe().split("\n")
            )
        if len(census) > _LISTED:
            rest = census[_LISTED:]
            lines.append(f"  ... and {len(rest)} more, {format_bytes(rest.total_bytes)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (tensors as description lines)."""
        return {
            "device": self.device,
            "name": self.name,
            "verdict": self.verdict,
            "leak_check": self.leak_check,
            "leaked_bytes": self.leaked_bytes,
            "allocator_growth_bytes": self.allocator_growth_bytes,
            "driver_growth_bytes": self.driver_growth_bytes,
            "peak_bytes": self.peak_bytes,
            "tolerance_bytes": self.tolerance_bytes,
            "process_tolerance_bytes": self.process_tolerance_bytes,
            "checks": self.checks,
            "seconds": self.seconds,
            "raised": self.raised,
            "new_tensors": (
                None if self.new_tensors is None else [t.describe() for t in self.new_tensors]
            ),
            "held": {h.tensor.describe(): [str(c) for c in h.referrers] for h in self.held},
            "cleanup": None if self.cleanup is None else self.cleanup.to_dict(),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "delta": self.delta.to_dict(),
        }

    def __str__(self) -> str:
        return self.message()


class SessionDecorated(Protocol[P, R_co]):
    """A function wrapped by a :class:`GpuSession`: call it as before."""

    session: GpuSession
    """The session each call runs in; its ``last_report`` is the latest call's."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Run the function inside a fresh entry of :attr:`session`."""
        ...


class _Baseline:
    """The storages alive before the block, held weakly.

    A storage freed during the block may leave its address to a new one, so an
    address seen before proves nothing alone: a storage counts as old only
    while the storage seen before at that address is still alive.
    """

    __slots__ = ("_refs",)

    def __init__(self, census: TensorCensus) -> None:
        self._refs: dict[tuple[str, int], Any] = {}
        for info in census:
            tensor = info.tensor
            if tensor is not None:
                self._refs[info.storage_key] = _weak_storage(tensor)

    def new_in(self, census: TensorCensus) -> TensorCensus:
        fresh = []
        for info in census:
            ref = self._refs.get(info.storage_key, _MISSING)
            if ref is _MISSING or (ref is not None and ref.expired()):
                fresh.append(info)
        return TensorCensus(fresh)


_MISSING: Final = object()


def _weak_storage(tensor: Any) -> Any:
    """A weak reference to ``tensor``'s storage, or ``None`` where torch offers none."""
    try:
        from torch.multiprocessing.reductions import StorageWeakRef

        return StorageWeakRef(tensor.untyped_storage())  # type: ignore[no-untyped-call]
    except (ImportError, RuntimeError, AttributeError, NotImplementedError):
        return None  # no way to tell reuse apart: fall back to the address alone


class SessionRun:
    """One entry of a :class:`GpuSession`: what ``with gpu_session() as s`` binds to ``s``."""

    __slots__ = (
        "_baseline",
        "_before",
        "_peak_floor",
        "_report",
        "_started",
        "name",
        "session",
    )

    def __init__(self, session: GpuSession, name: str | None) -> None:
        self.session = session
        self.name = name
        self._report: SessionReport | None = None
        self._baseline: _Baseline | None = None
        self._before: MemorySnapshot | None = None
        self._peak_floor: int | None = None
        self._started = 0.0

    @property
    def report(self) -> SessionReport:
        """The report, filled when the block ends.

        Raises:
            ModelStateError: When read inside the block, before it is filled.
        """
        if self._report is None:
            raise ModelStateError(
                "the session's report is filled when its block ends; read it after the block"
            )
        return self._report

    @property
    def done(self) -> bool:
        """Whether the block has ended and :attr:`report` is filled."""
        return self._report is not None

    def __repr__(self) -> str:
        state = self._report.verdict if self._report is not None else "running"
        return f"<SessionRun {self.name or ''} on {self.session.device}: {state}>"


# Sessions in progress per device, so that an inner session's peak reset does
# not erase the peak an outer (or concurrent) session has already seen.
_peak_lock = threading.Lock()
_running: dict[str, list[SessionRun]] = {}
# The entries of `with` blocks in progress, per thread and per asyncio task.
_entries: contextvars.ContextVar[tuple[SessionRun, ...]] = contextvars.ContextVar(
    "vramkit_session_entries", default=()
)


class GpuSession:
    """Snapshot before, run, clean up, snapshot after, and judge whether memory came back.

    Build one with :func:`gpu_session`. The object holds settings only; each
    entry (``with``, ``async with``, or a call of a decorated function) gets a
    fresh :class:`SessionRun`, so the same session is safe to share between
    threads, to nest, and to decorate several functions with.
    """

    __slots__ = (
        "_last_report",
        "cleanup",
        "device",
        "leak_check",
        "name",
        "process_tolerance_bytes",
        "retries",
        "tolerance_bytes",
    )

    def __init__(
        self,
        device: DeviceLike | None = None,
        *,
        leak_check: LeakCheck | None = "raise",
        tolerance: int | float | str = "16MiB",
        cleanup: bool = True,
        retries: int = 3,
        process_tolerance: int | float | str | None = None,
        name: str | None = None,
    ) -> None:
        """Check the settings and resolve the device (see :func:`gpu_session`)."""
        if leak_check not in _LEAK_CHECKS:
            raise InvalidArgumentError(
                f'leak_check must be "raise", "warn" or None; got {leak_check!r}'
            )
        check_flag(cleanup, "cleanup")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise InvalidArgumentError(
                f"retries must be a whole number of re-checks, 0 or more; got {retries!r}"
            )
        if name is not None and not isinstance(name, str):
            raise InvalidArgumentError(f"name must be a string or None; got {name!r}")
        self.device: Device = resolve_device(device)
        self.leak_check: LeakCheck | None = leak_check
        self.tolerance_bytes = parse_bytes(tolerance, what="tolerance")
        self.process_tolerance_bytes = (
            None
            if process_tolerance is None
            else parse_bytes(process_tolerance, what="process_tolerance")
        )
        self.cleanup = cleanup
        self.retries = retries
        self.name = name
        self._last_report: SessionReport | None = None

    @property
    def last_report(self) -> SessionReport | None:
        """The report of the entry that finished last, in any thread (``None`` before any).

        For the report of one particular entry, use the context manager's
        :attr:`SessionRun.report`.
        """
        return self._last_report

    # -- context manager ---------------------------------------------------------

    def __enter__(self) -> SessionRun:
        run = self._start(self.name)
        _entries.set((*_entries.get(), run))
        return run

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack = _entries.get()
        for position in range(len(stack) - 1, -1, -1):
            if stack[position].session is self:
                run = stack[position]
                _entries.set(stack[:position] + stack[position + 1 :])
                break
        else:
            raise ModelStateError("this session was exited without being entered")
        self._finish(run, exc)

    async def __aenter__(self) -> SessionRun:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    # -- decorator ---------------------------------------------------------------

    def __call__(self, function: Callable[P, R]) -> SessionDecorated[P, R]:
        """Run every call of ``function`` in a fresh entry of this session.

        Coroutine functions get an async wrapper, so the session spans the
        awaited call. The wrapper's ``session`` attribute is this object.
        """
        if not callable(function) or inspect.isclass(function):
            raise InvalidArgumentError(
                f"a session decorates a function or coroutine function; got {function!r}"
            )
        session, name = self, self.name or qualname(function)
        wrapper: Any = wrap_calls(
            function,
            function,
            start=lambda: session._start(name),
            failed=session._finish,
            succeeded=lambda run: session._finish(run, None),
        )
        wrapper.session = session
        return cast("SessionDecorated[P, R]", wrapper)

    def __repr__(self) -> str:
        return (
            f"GpuSession({str(self.device)!r}, leak_check={self.leak_check!r}, "
            f"tolerance={format_bytes(self.tolerance_bytes)!r}, cleanup={self.cleanup}, "
            f"retries={self.retries}, name={self.name!r})"
        )

    # -- the work ----------------------------------------------------------------

    def _start(self, name: str | None) -> SessionRun:
        run = SessionRun(self, name)
        device = self.device
        if self.leak_check is not None:
            device.warm_up()  # a context created inside the block is not a leak
            if not device.is_host:
                # Start from an empty cache so that the driver reading after the
                # block can confirm (or not) what the allocator says. A full
                # collection: a dead cycle left in the oldest generation and
                # collected during the block would offset a leak of its size.
                device.release_workspaces()
                cleanup(device)
            run._baseline = _Baseline(live_tensors(device))
        name = str(device)
        with _peak_lock:
            before = snapshot(device)
            prior = peak_bytes(before[name])
            for other in _running.get(name, ()):
                if prior is not None:
                    other._peak_floor = max(other._peak_floor or 0, prior)
            device.reset_peak()
            _running.setdefault(name, []).append(run)
        run._before = before
        run._started = time.perf_counter()
        return run

    def _finish(self, run: SessionRun, exc: BaseException | None) -> None:
        try:
            report = self._measure(run, exc)
        except Exception:
            if exc is None:
                raise
            # The block's own exception is what the caller must see.
            _log.warning("could not measure session %s", run.name, exc_info=True)
            return
        run._report = report
        self._last_report = report
        if exc is not None:
            return  # never mask the block's exception with a verdict
        if report.verdict == "leak":
            if self.leak_check == "raise":
                raise VramLeakError(report.message())
            warnings.warn(report.message(), VramLeakWarning, stacklevel=3)
        elif report.verdict == "unverified":
            warnings.warn(report.message(), VramLeakWarning, stacklevel=3)

    def _measure(self, run: SessionRun, exc: BaseException | None) -> SessionReport:
        seconds = time.perf_counter() - run._started
        device, name = self.device, str(self.device)
        before = run._before
        assert before is not None  # set by _start
        with _peak_lock:
            ended = snapshot(device)
            running = _running.get(name, [])
            if run in running:
                running.remove(run)
        peak = _max_known(peak_bytes(ended[name]), run._peak_floor)
        report_of_cleanup: CleanupReport | None = None
        if self.cleanup:
            device.release_workspaces()
            # The young generations hold what the block just dropped; a full
            # collection walks the whole heap (0.2 s with FunASR loaded) and
            # runs below only when a leak check suspects what is left.
            report_of_cleanup = cleanup(device, generation=_YOUNG)
        after = report_of_cleanup.after if report_of_cleanup is not None else ended
        if self.leak_check is None:
            return SessionReport(
                device=name,
                name=run.name,
                before=before,
                after=after,
                peak_bytes=peak,
                cleanup=report_of_cleanup,
                new_tensors=None,
                held=(),
                allocator_growth_bytes=_allocator_growth(before[name], after[name]),
                driver_growth_bytes=_driver_growth(before[name], after[name]),
                leaked_bytes=None,
                verdict="unchecked",
                leak_check=None,
                tolerance_bytes=self.tolerance_bytes,
                process_tolerance_bytes=self.process_tolerance_bytes,
                checks=0,
                seconds=seconds,
                raised=_describe_exception(exc),
            )
        baseline = run._baseline
        assert baseline is not None  # taken by _start when leak_check is set
        run._baseline = None  # its weak references are of no use after this
        on_host = usage_layer(before[name]) != "allocated"  # no allocator counts: a census
        # A cycle that outlived a few collections sits in the oldest generation,
        # where the young collection above leaves it: suspected growth is always
        # re-checked after a full one, so it never reads as a leak.
        cleaned = False
        reading, checks = self._check(baseline, before[name], on_host, after), 1
        attempt = 0
        while self._suspicious(reading) and exc is None and (not cleaned or attempt < self.retries):
            if cleaned:
                attempt += 1
                time.sleep(_PAUSE_SECONDS * attempt)
            device.release_workspaces()
            latest = cleanup(device)
            report_of_cleanup = report_of_cleanup or latest
            cleaned = True
            reading = self._check(baseline, before[name], on_host, latest.after)
            checks += 1
        census = reading.census
        if census is None:  # on an accelerator the census is for the report only
            census = baseline.new_in(live_tensors(device))
        verdict, leaked = self._judge(reading, on_host)
        held: tuple[HeldTensor, ...] = ()
        if verdict != "clean" and exc is None:
            held = _holders(census[:_HINTED])
        return SessionReport(
            device=name,
            name=run.name,
            before=before,
            after=reading.snapshot,
            peak_bytes=peak,
            cleanup=report_of_cleanup,
            new_tensors=census,
            held=held,
            allocator_growth_bytes=reading.allocator,
            driver_growth_bytes=reading.driver,
            leaked_bytes=leaked,
            verdict=verdict,
            leak_check=self.leak_check,
            tolerance_bytes=self.tolerance_bytes,
            process_tolerance_bytes=self.process_tolerance_bytes,
            checks=checks,
            seconds=seconds,
            raised=_describe_exception(exc),
        )

    def _check(
        self, baseline: _Baseline, before: DeviceMemory, on_host: bool, latest: MemorySnapshot
    ) -> _Reading:
        name = str(self.device)
        census = None
        if on_host:
            census = baseline.new_in(live_tensors(self.device))
            allocator: int | None = census.total_bytes
        else:
            allocator = _allocator_growth(before, latest[name])
        return _Reading(latest, allocator, _driver_growth(before, latest[name]), census)

    def _suspicious(self, reading: _Reading) -> bool:
        """Whether the reading could become a leak or unverified verdict: worth re-checking."""
        if reading.allocator is not None and reading.allocator > self.tolerance_bytes:
            return True
        return (
            self.process_tolerance_bytes is not None
            and reading.driver is not None
            and reading.driver > self.process_tolerance_bytes
        )

    def _judge(self, reading: _Reading, on_host: bool) -> tuple[Verdict, int]:
        allocator = reading.allocator or 0
        if allocator > self.tolerance_bytes:
            if on_host:
                return "leak", allocator  # untouched pages never reach RSS: no confirmation
            # As in CudaMemoryLeakCheck: the driver must confirm the allocator.
            if reading.driver is not None and reading.driver > 0:
                return "leak", allocator
            return "unverified", allocator
        if (
            self.process_tolerance_bytes is not None
            and reading.driver is not None
            and reading.driver > self.process_tolerance_bytes
        ):
            return "leak", reading.driver
        return "clean", max(allocator, 0)


@dataclass(frozen=True, slots=True)
class _Reading:
    snapshot: MemorySnapshot
    allocator: int | None
    driver: int | None
    census: TensorCensus | None


def _holders(largest: TensorCensus) -> tuple[HeldTensor, ...]:
    """Who holds each of ``largest``: one search for all, bounded by work, not by time.

    The same leak gets the same report on an idle machine and a busy one.
    """
    infos = [info for info in largest if info.tensor is not None]
    targets = [info.tensor for info in infos]
    chains = find_holders_each(targets, ignore=[targets, infos])
    targets.clear()
    return tuple(HeldTensor(info, tuple(found)) for info, found in zip(infos, chains, strict=True))


def _max_known(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _allocator_growth(before: DeviceMemory, after: DeviceMemory) -> int | None:
    return DeviceMemoryDelta.between(before, after).allocated_bytes


def _driver_growth(before: DeviceMemory, after: DeviceMemory) -> int | None:
    """Growth in the driver's (or the OS's) layer: see :data:`vramkit.memory.DRIVER_LAYERS`."""
    delta = DeviceMemoryDelta.between(before, after)
    return layer_bytes(delta, driver_layer(delta))


def _describe_exception(exc: BaseException | None) -> str | None:
    # A string, not the exception: the exception's traceback holds the
    # block's frames, and with them every tensor the block allocated.
    return None if exc is None else f"{type(exc).__name__}: {exc}"


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
