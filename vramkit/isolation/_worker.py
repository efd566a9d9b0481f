"""The caller's side of a worker process: start it, call it, notice its death, end it.

A :class:`Worker` owns one spawned process and three channels to it: the call
socket (pickled requests and replies, see :mod:`._transport`), a lifeline pipe
whose write end only this process holds (the worker exits when it reads end
of file), and a log pipe carrying the worker's stdout and stderr.

One daemon thread per process (the monitor, :mod:`._monitor`) starts every
worker, reads their logs and notices their exits.

Calls are serialised: a worker runs one request at a time, so a second caller
waits for the first (bounded by its own ``timeout``).
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import itertools
import logging
import os
import select
import signal
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final, NoReturn

from vramkit.devices import process_used_bytes, resolve_device
from vramkit.errors import ModelStateError, WorkerCrashedError, WorkerTimeoutError
from vramkit.isolation import _child
from vramkit.isolation._monitor import monitor
from vramkit.isolation._process import WorkerProcess, main_preparation
from vramkit.isolation._spec import Isolation, WorkerSpec
from vramkit.isolation._transport import Channel, ChannelClosedError

__all__ = ["RemoteTraceback", "StopReport", "Worker", "WorkerState", "live_workers"]

_log = logging.getLogger("vramkit.isolation")
_SHOWN_LINES: Final = 20  # of the kept log lines, how many a crash message quotes
_NO_DEADLINE: Final = float("inf")


class WorkerState(str, Enum):
    """Where a worker process is in its life."""

    STARTING = "STARTING"
    READY = "READY"
    STOPPING = "STOPPING"
    STOPPED = "STOPPED"
    CRASHED = "CRASHED"


@dataclass(frozen=True, slots=True)
class StopReport:
    """How a worker process ended.

    Attributes:
        pid: Its process id.
        how: ``"exited"`` (asked, it left by itself), ``"terminated"``
            (``SIGTERM``), ``"killed"`` (``SIGKILL``), ``"crashed"`` (it had
            died already), or ``"unknown"`` (still there after every step).
        exitcode: Its exit status; negative: the signal that ended it.
        gone: Whether the process was reaped: it no longer exists, and the
            operating system has taken back all its memory.
        seconds: Wall time of the stop.
    """

    pid: int
    how: str
    exitcode: int | None
    gone: bool
    seconds: float


class RemoteTraceback(Exception):
    """The worker's traceback, attached as ``__cause__`` of an exception re-raised here."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text

    def __str__(self) -> str:
        return "\n\n" + self.text.rstrip() + "\n(raised in the worker process)"


_workers: weakref.WeakSet[Worker] = weakref.WeakSet()
_workers_lock = threading.Lock()
_atexit_registered = False


def live_workers() -> list[Worker]:
    """Every worker process of this process that has not been stopped or crashed."""
    with _workers_lock:
        workers = list(_workers)
    return [w for w in workers if w.state in (WorkerState.STARTING, WorkerState.READY)]


class Worker:
    """One worker process running one model.

    Args:
        spec: What the worker builds (its loader, name, device and options).
        options: Time bounds and the log tail's length.
    """

    def __init__(self, spec: WorkerSpec, options: Isolation) -> None:
        self._spec = spec
        self._options = options
        self._lock = threading.Lock()  # one request at a time on the channel
        self._state_lock = threading.Lock()
        self._state = WorkerState.STARTING
        self._ids = itertools.count(1)
        self._process: WorkerProcess | None = None
        self._channel: Channel | None = None
        self._lifeline = -1
        self._poller: select.poll | None = None
        self._sentinel = -1
        self._pid = 0
        self._info: dict[str, Any] = {}
        self._tail: collections.deque[str] = collections.deque(maxlen=options.log_lines)
        self._partial = b""
        self._drained = threading.Event()  # the monitor has read its last output
        self._crash: WorkerCrashedError | None = None
        self._stop_report: StopReport | None = None
        self._finished = False
        self._exitcode: int | None = None  # kept once the process object is closed
        self._process_closed = False
        self._on_exit: list[Callable[[Worker, WorkerCrashedError], object]] = []
        self.remote_paths: set[tuple[tuple[str, Any], ...]] = set()
        """Attribute paths known to stay in the worker (methods, submodules)."""

    # ------------------------------------------------------------------ view

    @property
    def name(self) -> str:
        """The model's name."""
        return self._spec.name

    @property
    def device(self) -> str:
        """The model's device, as torch writes it."""
        return self._spec.device

    @property
    def pid(self) -> int:
        """The worker's process id (0 before it started)."""
        return self._pid

    @property
    def state(self) -> WorkerState:
        """Where the worker is in its life."""
        return self._state

    @property
    def options(self) -> Isolation:
        """Its time bounds."""
        return self._options

    @property
    def info(self) -> dict[str, Any]:
        """What the worker said when ready: ``pid``, ``type``, ``callable``, ``load`` report."""
        return self._info

    @property
    def exitcode(self) -> int | None:
        """The process's exit status once it ended (negative: the signal), else ``None``."""
        if self._exitcode is not None:
            return self._exitcode
        process = self._process
        if process is None or self._process_closed:
            return None
        return process.exitcode

    @property
    def crash(self) -> WorkerCrashedError | None:
        """The error its death raised, once it crashed."""
        return self._crash

    def used_bytes(self) -> int | None:
        """Bytes the process holds on its device as the driver sees them (its RSS on cpu).

        NVML's per-process figure on CUDA (the context included); without it,
        the worker's own reading of its device. 0 once the process is gone.
        """
        seen = process_used_bytes(resolve_device(self.device), self._pid)
        if seen is not None or self._state is not WorkerState.READY:
            return seen
        reading, _ = self.request("read", ())
        value = reading.process_used_bytes or reading.reserved_bytes
        return None if value is None else int(value)

    def log_lines(self) -> tuple[str, ...]:
        """The last lines the worker wrote to stdout and stderr, oldest first."""
        lines = tuple(self._tail)
        return (*lines, self._partial.decode(errors="replace")) if self._partial else lines

    def on_exit(self, callback: Callable[[Worker, WorkerCrashedError], object]) -> None:
        """Call ``callback(worker, error)`` once if the worker dies without being stopped.

        It runs in the thread that noticed (a caller, before its call raises,
        or the monitor thread for a worker that died idle); it must be quick.
        A worker that already crashed calls it at once.
        """
        with self._state_lock:
            crash = self._crash
            if crash is None:
                self._on_exit.append(callback)
        if crash is not None:
            callback(self, crash)

    def __repr__(self) -> str:
        return f"<Worker {self.name!r} pid {self._pid} {self._state.value}>"

    # ------------------------------------------------------------------ start

    def start(self) -> dict[str, Any]:
        """Spawn the process and wait until its model is loaded.

        Returns:
            The worker's ready information (see :attr:`info`).

        Raises:
            WorkerCrashedError: The worker died while starting or loading.
            WorkerTimeoutError: It was not ready within ``start_timeout``.
            Exception: Whatever the loader raised in the worker, re-raised here
                with the worker's traceback as ``__cause__``.
        """
        global _atexit_registered
        parent_sock, child_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        lifeline_r, lifeline_w = os.pipe()
        log_r, log_w = os.pipe()
        try:
            process = monitor().run(
                lambda: WorkerProcess.spawn(child_sock.fileno(), lifeline_r, log_w)
            )
        except BaseException:
            os.close(log_r)
            os.close(lifeline_w)
            parent_sock.close()
            raise
        finally:
            # The child has its copies now; ours would keep the pipes open.
            child_sock.close()
            os.close(lifeline_r)
            os.close(log_w)
        assert isinstance(process, WorkerProcess)
        self._process = process
        self._pid = process.pid
        self._channel = Channel(parent_sock)
        self._lifeline = lifeline_w
        self._sentinel = process.sentinel
        self._poller = select.poll()
        self._poller.register(self._channel.fileno(), select.POLLIN)
        self._poller.register(self._sentinel, select.POLLIN)
        monitor().watch(self, os.dup(self._sentinel), log_r)
        with _workers_lock:
            _workers.add(self)
            if not _atexit_registered:
                atexit.register(_stop_all)
                _atexit_registered = True
        try:
            with contextlib.suppress(ChannelClosedError):  # a failed start shows in the reply
                self._channel.send(main_preparation(self._spec))
            info: dict[str, Any] = self.request(
                "start", self._spec, timeout=self._options.start_timeout
            )
        except BaseException:
            self.stop()
            raise
        with self._state_lock:
            if self._state is WorkerState.STARTING:
                self._state = WorkerState.READY
        self._info = info
        return info

    # ------------------------------------------------------------------ requests

    def request(self, op: str, payload: Any, *, timeout: float | None = None) -> Any:
        """Send one request and wait for its reply.

        Args:
            op: ``"call"``, ``"get"``, ``"set"``, ``"dir"``, ``"len"``,
                ``"offload"``, ``"wake"``, ``"read"`` (or ``"start"``, once).
            payload: The request's arguments, as the worker's handler takes them.
            timeout: Seconds to wait for the worker, queueing behind other
                callers included (``None``: no limit).

        Raises:
            ModelStateError: The worker was stopped (a stale reference).
            WorkerCrashedError: The worker died before replying.
            WorkerTimeoutError: No reply in time; the worker was killed.
            TimeoutError: The time ran out while other calls held the worker
                (it was left alone: it is busy, not hung).
            Exception: What the worker raised, with its traceback as ``__cause__``.
        """
        deadline = _NO_DEADLINE if timeout is None else time.monotonic() + timeout
        self._check_usable(op)
        if not self._lock.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            raise TimeoutError(
                f"{self.name}: waited {timeout} s while the worker was busy with other calls"
            )
        try:
            self._check_usable(op)
            assert self._channel is not None
            call_id = next(self._ids)
            try:
                self._channel.send((call_id, op, payload))
            except ChannelClosedError:
                raise self._died(op) from None
            return self._await_reply(call_id, op, deadline, timeout)
        finally:
            if self._state in (WorkerState.CRASHED, WorkerState.STOPPED):
                self._finish()
            self._lock.release()

    def _await_reply(self, call_id: int, op: str, deadline: float, timeout: float | None) -> Any:
        assert self._channel is not None
        assert self._poller is not None
        channel = self._channel
        channel_fd = channel.fileno()
        spun = channel.spin()  # a fast reply lands without a sleep; a slow one: poll below
        while True:
            if deadline == _NO_DEADLINE:
                wait_ms = None
            else:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise self._timed_out(op, timeout)
                wait_ms = max(int(remaining * 1000) + 1, 1)
            ready = [channel_fd] if spun else [fd for fd, _ in self._poller.poll(wait_ms)]
            spun = False
            if channel_fd in ready:
                try:
                    frame = self._channel.recv_frame()
                except ChannelClosedError:
                    raise self._died(op) from None
                except BaseException:
                    # Interrupted half-way through a message: the stream cannot
                    # be trusted any more, and neither can the worker's state.
                    self._kill_unanswerable(f"interrupted while receiving the reply to {op}")
                    raise
                # A reply that cannot be rebuilt here (its class is not
                # importable) raises to the caller; the stream is still in step.
                reply_id, ok, value = self._channel.decode(frame)
                if reply_id is not None and reply_id != call_id:
                    # The late reply to a call that was interrupted here; ours
                    # may have come in the same read, where poll cannot see it.
                    spun = channel.pending()
                    continue
                if ok:
                    return value
                _raise_remote(value)
            elif self._sentinel in ready:
                raise self._died(op)

    def _check_usable(self, op: str) -> None:
        state = self._state
        if state is WorkerState.CRASHED and self._crash is not None:
            raise self._crash
        if state in (WorkerState.STOPPING, WorkerState.STOPPED):
            raise ModelStateError(
                f"{self.name} was unloaded and its worker process (pid {self._pid}) ended; "
                f"this reference to it is stale: borrow the model with `{self.name}.use()` "
                "instead of keeping what it returned"
            )

    # ------------------------------------------------------------------ death

    def _died(self, op: str) -> WorkerCrashedError:
        """The worker is gone while ``op`` was in flight: mark it crashed, tell the owner."""
        process = self._process
        assert process is not None
        process.join(self._options.kill_timeout)
        self._drained.wait(2.0)  # let the monitor read its last words
        return self._mark_crashed(self._crash_error(op, timed_out=False))

    def _timed_out(self, op: str, timeout: float | None) -> WorkerCrashedError:
        self._kill_unanswerable(f"{_OPS.get(op, op)} got no reply within {timeout} s")
        return self._mark_crashed(self._crash_error(op, timed_out=True, timeout=timeout))

    def _kill_unanswerable(self, why: str) -> None:
        process = self._process
        assert process is not None
        _log.warning("%s: %s; killing its worker (pid %d)", self.name, why, self._pid)
        with contextlib.suppress(ValueError, OSError):
            process.kill()
        process.join(self._options.kill_timeout)
        self._drained.wait(2.0)

    def _crash_error(
        self, op: str | None, *, timed_out: bool, timeout: float | None = None
    ) -> WorkerCrashedError:
        exitcode = self.exitcode
        number = -exitcode if exitcode is not None and exitcode < 0 else None
        lines = self.log_lines()
        when = _describe_op(op)
        if timed_out:
            text = (
                f"{self.name}: its worker process (pid {self._pid}) did not finish "
                f"{_OPS.get(op or '', op)} within {timeout} s and was killed"
            )
        else:
            text = f"{self.name}: its worker process (pid {self._pid}) {_how(exitcode)} {when}"
        text += "; the model is UNLOADED and its next use starts a new worker"
        if lines:
            text += ". Its last output:\n    " + "\n    ".join(lines[-_SHOWN_LINES:])
        kind = WorkerTimeoutError if timed_out else WorkerCrashedError
        return kind(
            text,
            model=self.name,
            pid=self._pid,
            exitcode=None if number is not None else exitcode,
            signal=number,
            log_lines=lines,
        )

    def _mark_crashed(self, error: WorkerCrashedError) -> WorkerCrashedError:
        """Record the crash once and run the exit callbacks; returns the recorded error."""
        with self._state_lock:
            if self._state in (WorkerState.STARTING, WorkerState.READY):
                self._state = WorkerState.CRASHED
                self._crash = error
                callbacks = list(self._on_exit)
            else:
                callbacks = []
            recorded = self._crash or error
        _log.warning("%s", recorded)
        for callback in callbacks:
            try:
                callback(self, recorded)
            except Exception:
                _log.exception("%s: a worker exit callback failed", self.name)
        return recorded

    def _exited(self) -> None:
        """Called by the monitor once the process is gone and its output read."""
        self._drained.set()
        with self._lock:  # any call in flight sees the death itself, and finishes first
            process = self._process
            if process is not None and not self._process_closed:
                process.join(self._options.kill_timeout)  # reap it, for its exit status
            if self._state in (WorkerState.STARTING, WorkerState.READY):
                self._mark_crashed(self._crash_error(None, timed_out=False))
            if self._state in (WorkerState.CRASHED, WorkerState.STOPPED):
                self._finish()

    def _feed(self, data: bytes) -> None:
        """Output from the worker (monitor thread): keep the tail, log each line."""
        text = self._partial + data
        *lines, self._partial = text.replace(b"\r", b"\n").split(b"\n")
        for raw in lines:
            if raw:
                line = raw.decode(errors="replace")
                self._tail.append(line)
                _log.debug("%s[%d]: %s", self.name, self._pid, line)

    # ------------------------------------------------------------------ stop

    def stop(self) -> StopReport:
        """End the worker: ask it to exit, then ``SIGTERM``, then ``SIGKILL``, each bounded.

        Idempotent: a stopped or crashed worker answers how it ended.

        Returns:
            A :class:`StopReport`; ``gone`` says whether the process was reaped.
        """
        with self._state_lock:
            if self._stop_report is not None:
                return self._stop_report
            crashed = self._state is WorkerState.CRASHED
            if not crashed:
                self._state = WorkerState.STOPPING
        started = time.perf_counter()
        options = self._options
        process = self._process
        how = "crashed"
        held = self._lock.acquire(timeout=options.stop_timeout)
        try:
            if process is not None and not crashed:
                how = self._end(process, asked=held)
            if not held:
                # A call was in flight; with the worker gone it fails at once.
                held = self._lock.acquire(timeout=options.kill_timeout)
            exitcode = self.exitcode
            if exitcode is not None:
                self._drained.wait(2.0)  # the monitor has read its output and let go
            report = StopReport(
                self._pid,
                how if exitcode is not None or process is None else "unknown",
                exitcode,
                process is None or exitcode is not None,
                time.perf_counter() - started,
            )
            with self._state_lock:
                self._state = WorkerState.STOPPED if not crashed else WorkerState.CRASHED
                self._stop_report = report
            if held:
                self._finish()
        finally:
            if held:
                self._lock.release()
        return report

    def _end(self, process: WorkerProcess, *, asked: bool) -> str:
        """Graceful, then terminate, then kill; returns which ended it."""
        options = self._options
        if asked and self._channel is not None:
            with contextlib.suppress(ChannelClosedError, OSError):
                self._channel.send((next(self._ids), "stop", ()))
            process.join(options.stop_timeout)
            if process.exitcode is not None:
                return "exited"
        for how, end, wait in (
            ("terminated", process.terminate, options.terminate_timeout),
            ("killed", process.kill, options.kill_timeout),
        ):
            with contextlib.suppress(OSError, ValueError):
                end()
            process.join(wait)
            if process.exitcode is not None:
                return how
        return "unknown"

    def _finish(self) -> None:
        """Close this side's channels (caller holds the request lock). Idempotent."""
        if self._finished:
            return
        if self._poller is not None and self._channel is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._poller.unregister(self._channel.fileno())
                self._poller.unregister(self._sentinel)
        if self._channel is not None:
            self._channel.close()
        if self._lifeline >= 0:
            os.close(self._lifeline)  # a worker somehow still alive now exits
            self._lifeline = -1
        process = self._process
        if process is not None and process.exitcode is not None:
            self._exitcode = process.exitcode
            process.close()  # its sentinel
            self._process_closed = True
        self._finished = True


_OPS: Final = {
    "start": "the load of its model",
    "call": "a call",
    "get": "an attribute read",
    "set": "an attribute write",
    "dir": "a dir()",
    "len": "a len()",
    "offload": "an offload",
    "wake": "a wake",
    "read": "a memory reading",
}


def _describe_op(op: str | None) -> str:
    return "while idle" if op is None else f"during {_OPS.get(op, op)}"


def _how(exitcode: int | None) -> str:
    if exitcode is None:
        return "is gone (its exit status is unknown)"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (signal {-exitcode})"
    return f"exited with status {exitcode}"


def _raise_remote(error: _child.RemoteError) -> NoReturn:
    """Re-raise an exception from the worker, with the worker's traceback as its cause."""
    import pickle

    exc: BaseException | None = None
    if error.pickled is not None:
        try:
            exc = pickle.loads(error.pickled)
        except Exception:
            exc = None  # its type does not exist here
    if not isinstance(exc, BaseException):
        exc = RuntimeError(f"{error.type_name}: {error.message}")
    raise exc from RemoteTraceback(error.traceback)


def _stop_all() -> None:
    """At interpreter exit: end every worker still running."""
    for worker in live_workers():
        with contextlib.suppress(Exception):
            worker.stop()
