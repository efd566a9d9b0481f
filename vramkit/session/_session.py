"""A session and its entries: a :class:`GpuSession` holds settings, each entry is a run.

Entering takes the baseline (a census when a leak check is on) and the peak
floor; leaving measures, cleans up, and asks ``_leak`` for a verdict.

A leak-checked entry freezes the heap until it ends (see
:class:`vramkit._gc.Boundary`): the census on entry and on exit then walks
what the block made, not the whole heap.
"""

from __future__ import annotations

import contextvars
import inspect
import logging
import threading
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final, ParamSpec, Protocol, TypeVar, cast

from vramkit._gc import Boundary, enter_boundary, leave_boundary, tensors_since
from vramkit._units import check_flag, format_bytes, parse_bytes
from vramkit._utils import qualname, wrap_calls
from vramkit.cleaning import CleanupReport, cleanup
from vramkit.devices import Device, DeviceLike, resolve_device
from vramkit.errors import InvalidArgumentError, ModelStateError, VramLeakError, VramLeakWarning
from vramkit.memory import MemorySnapshot, peak_bytes, snapshot
from vramkit.session._leak import allocator_growth, driver_growth, examine
from vramkit.session._report import LeakCheck, SessionReport
from vramkit.tensors import StorageBaseline

__all__ = ["GpuSession", "SessionDecorated", "SessionRun"]

P = ParamSpec("P")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_LEAK_CHECKS: Final = ("raise", "warn", None)
_YOUNG: Final = 1  # gc generations 0 and 1: what was made since the last collections
_log = logging.getLogger("vramkit")


class SessionDecorated(Protocol[P, R_co]):
    """A function wrapped by a :class:`GpuSession`: call it as before."""

    session: GpuSession
    """The session each call runs in; its ``last_report`` is the latest call's."""

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R_co:
        """Run the function inside a fresh entry of :attr:`session`."""
        ...


class SessionRun:
    """One entry of a :class:`GpuSession`: what ``with gpu_session() as s`` binds to ``s``."""

    __slots__ = (
        "_baseline",
        "_before",
        "_boundary",
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
        self._baseline: StorageBaseline | None = None
        self._boundary: Boundary | None = None
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
            run._boundary = enter_boundary()
        try:
            return self._begin(run, device)
        except BaseException:
            _leave(run)
            raise

    def _begin(self, run: SessionRun, device: Device) -> SessionRun:
        if self.leak_check is not None:
            made = tensors_since(run._boundary)
            if made is None:  # the boundary broke before this entry: walk everything
                _leave(run)
            run._baseline = StorageBaseline(device, made)
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
        finally:
            _leave(run)
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
                allocator_growth_bytes=allocator_growth(before[name], after[name]),
                driver_growth_bytes=driver_growth(before[name], after[name]),
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
        found = examine(
            device,
            baseline,
            before[name],
            after,
            tolerance=self.tolerance_bytes,
            process_tolerance=self.process_tolerance_bytes,
            retries=self.retries,
            raised=exc is not None,
            boundary=run._boundary,
        )
        return SessionReport(
            device=name,
            name=run.name,
            before=before,
            after=found.snapshot,
            peak_bytes=peak,
            cleanup=report_of_cleanup if report_of_cleanup is not None else found.cleanup,
            new_tensors=found.census,
            held=found.held,
            allocator_growth_bytes=found.allocator,
            driver_growth_bytes=found.driver,
            leaked_bytes=found.leaked,
            verdict=found.verdict,
            leak_check=self.leak_check,
            tolerance_bytes=self.tolerance_bytes,
            process_tolerance_bytes=self.process_tolerance_bytes,
            checks=found.checks,
            seconds=seconds,
            raised=_describe_exception(exc),
            note=found.note,
        )


def _leave(run: SessionRun) -> None:
    """End the run's part in the heap's boundary, once."""
    boundary, run._boundary = run._boundary, None
    if boundary is not None:
        leave_boundary(boundary)


def _max_known(a: int | None, b: int | None) -> int | None:
    if a is None:
        return b
    return a if b is None else max(a, b)


def _describe_exception(exc: BaseException | None) -> str | None:
    # A string, not the exception: the exception's traceback holds the
    # block's frames, and with them every tensor the block allocated.
    return None if exc is None else f"{type(exc).__name__}: {exc}"
