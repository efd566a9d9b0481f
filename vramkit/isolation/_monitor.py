"""The thread that starts worker processes, reads their output and notices their exits.

One daemon thread per process. Starting workers there matters on Linux: a
worker asks for ``SIGKILL`` when its parent dies (``PR_SET_PDEATHSIG``), and
the kernel sends it when the *thread* that forked the worker exits, so a
worker started from a short-lived thread (``asyncio.to_thread``, a prefetch
executor) would die with that thread. This one lives as long as the process.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import logging
import os
import select
import threading
from collections.abc import Callable
from typing import Final, Protocol

__all__ = ["Watched", "monitor"]

_log = logging.getLogger("vramkit.isolation")
_READ_SIZE: Final = 65536


class Watched(Protocol):
    """What the monitor tells a worker."""

    def _feed(self, data: bytes) -> None:
        """Output the worker wrote."""
        ...

    def _exited(self) -> None:
        """The process is gone and its last output was read."""
        ...


class _Watch:
    __slots__ = ("log_fd", "sentinel", "worker")

    def __init__(self, worker: Watched, sentinel: int, log_fd: int) -> None:
        self.worker = worker
        self.sentinel = sentinel
        self.log_fd = log_fd


class _Monitor:
    """The thread that starts workers, reads their output and notices their exits."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._tasks: collections.deque[
            tuple[Callable[[], object], concurrent.futures.Future[object]]
        ] = collections.deque()
        self._poller = select.poll()
        self._poller.register(self._wake_r, select.POLLIN)
        self._by_fd: dict[int, _Watch] = {}
        self._thread = threading.Thread(target=self._run, name="vramkit-workers", daemon=True)
        self._thread.start()

    def run(self, task: Callable[[], object]) -> object:
        """Run ``task`` on the monitor thread and return its result (or raise its error)."""
        if threading.current_thread() is self._thread:
            return task()  # from an exit callback: queueing would wait for ourselves
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        self._tasks.append((task, future))
        os.write(self._wake_w, b"\0")
        return future.result()

    def watch(self, worker: Watched, sentinel: int, log_fd: int) -> None:
        """Follow ``worker``: the monitor owns ``sentinel`` and ``log_fd`` and closes them."""

        def add() -> None:
            watch = _Watch(worker, sentinel, log_fd)
            os.set_blocking(log_fd, False)
            for fd in (sentinel, log_fd):
                self._by_fd[fd] = watch
                self._poller.register(fd, select.POLLIN)

        self.run(add)

    def _run(self) -> None:
        while True:
            for fd, _ in self._poller.poll():
                try:
                    self._handle(fd)
                except Exception:  # the thread must outlive any one worker's trouble
                    _log.exception("the worker monitor failed handling descriptor %d", fd)

    def _handle(self, fd: int) -> None:
        if fd == self._wake_r:
            with contextlib.suppress(BlockingIOError):
                os.read(self._wake_r, 4096)
            while self._tasks:
                task, future = self._tasks.popleft()
                try:
                    future.set_result(task())
                except BaseException as exc:
                    future.set_exception(exc)
            return
        watch = self._by_fd.get(fd)
        if watch is None:
            return
        if fd == watch.log_fd:
            if not self._read_log(watch):
                self._forget(fd)
                os.close(fd)
                watch.log_fd = -1
            return
        # The sentinel: the process is gone. Read what it wrote last, then report.
        while watch.log_fd >= 0 and self._read_log(watch, final=True):
            pass
        for owned in (watch.sentinel, watch.log_fd):
            if owned >= 0:
                self._forget(owned)
                os.close(owned)
        watch.log_fd = watch.sentinel = -1
        watch.worker._exited()

    def _read_log(self, watch: _Watch, *, final: bool = False) -> bool:
        """Read one chunk of a worker's output; ``False`` at end of file (or nothing, if final)."""
        try:
            data = os.read(watch.log_fd, _READ_SIZE)
        except BlockingIOError:
            return not final
        if data:
            watch.worker._feed(data)
        return bool(data)

    def _forget(self, fd: int) -> None:
        self._by_fd.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self._poller.unregister(fd)


_the_monitor: _Monitor | None = None
_monitor_lock = threading.Lock()


def monitor() -> _Monitor:
    """The process's monitor thread, started on first use (and again in a forked child)."""
    global _the_monitor
    with _monitor_lock:
        if _the_monitor is None or _the_monitor.pid != os.getpid():
            _the_monitor = _Monitor()
        return _the_monitor
