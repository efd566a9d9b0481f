"""Host RAM as a device: this process's resident set against the machine's (or cgroup's) RAM.

On Linux the reading comes straight from ``/proc`` through file descriptors
kept open, so a snapshot is cheap enough to take around every inference call:
RSS from one read of ``/proc/self/statm`` (a microsecond or two, where
``psutil`` costs ten), the machine's total once, and what changes slowly
(available memory, the peak) at most every :data:`THROTTLE_SECONDS` -- the
peak exactly on every read once it has been reset, since a reset means
someone judges it. Elsewhere ``psutil`` answers. Inside a cgroup with a
memory limit, the limit is the total and the cgroup's usage is what is used:
that is the memory this process can actually get.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import sys
import threading
import time
from typing import Any, Final

import psutil

from vramkit.devices._base import BackendBase, DeviceMemory

__all__ = ["THROTTLE_SECONDS", "CpuBackend", "malloc_trim"]

_KIB: Final = 1024
_monotonic = time.monotonic


# How old the system-wide fields (MemAvailable, the cgroup's usage) and the
# throttled peak may be: they change slowly, and /proc/meminfo and
# /proc/self/status cost ten times the /proc/self/statm read that gives RSS.
THROTTLE_SECONDS: Final = 0.1
# This process's own RSS moving this far re-reads the system-wide fields at
# once, so that memory a model just gave back shows as available.
_RSS_MOVE_BYTES: Final = 1024**2


class _ProcReader:
    """Keeps ``/proc`` and cgroup files open and re-opens them after ``fork``.

    Every read takes RSS from ``/proc/self/statm``. ``MemTotal`` (and the
    cgroup's limit) is read once; ``MemAvailable`` and the cgroup's usage at
    most every :data:`THROTTLE_SECONDS`, or at once when RSS moved. The peak
    (``VmHWM``) is read exactly on every read once the peak has been reset
    (someone judges it: every ``gpu_session`` does); before that it is the
    higher of a throttled ``VmHWM`` and the RSS read since.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = -1
        self._statm = -1
        self._status = -1
        self._meminfo = -1
        self._cgroup_current = -1
        self._cgroup_limit: int | None = None
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._total: int | None = None
        self._available: int | None = None
        self._current: int | None = None
        self._system_at = -math.inf  # monotonic seconds of the last meminfo read
        self._system_rss = 0  # RSS at that read
        self._hwm: int | None = None
        self._hwm_at = -math.inf
        self._rss_max = 0  # highest RSS read since the last VmHWM read
        self.tracking = False  # the peak was reset: read it exactly from now on

    def _open(self) -> None:
        # /proc/self resolves when opened: a child must not read its parent's file.
        for fd in (self._statm, self._status, self._meminfo, self._cgroup_current):
            if fd >= 0:
                os.close(fd)
        self._statm = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
        self._status = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
        self._meminfo = os.open("/proc/meminfo", os.O_RDONLY | os.O_CLOEXEC)
        self._cgroup_current = -1
        directory = _cgroup_dir()
        self._cgroup_limit = _cgroup_limit(directory)
        if self._cgroup_limit is not None:
            path = directory + "/memory.current"
            self._cgroup_current = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._pid = os.getpid()
        self._total = _field_kib(os.pread(self._meminfo, 8192, 0), b"MemTotal:")
        self._system_at = self._hwm_at = -math.inf

    def forget_peak(self) -> None:
        """The peak was reset: read it afresh now and on every read from now on."""
        with self._lock:
            self.tracking = True
            self._hwm_at = -math.inf

    def read(self) -> DeviceMemory:
        now = _monotonic()
        with self._lock:
            if self._pid != os.getpid():
                self._open()
            if self.tracking or now - self._hwm_at >= THROTTLE_SECONDS:
                status = os.pread(self._status, 8192, 0)
                rss = _field_kib(status, b"VmRSS:") or 0
                self._hwm, self._hwm_at, self._rss_max = _field_kib(status, b"VmHWM:"), now, rss
            else:
                rss = int(os.pread(self._statm, 128, 0).split(None, 2)[1]) * self._page
                if rss > self._rss_max:
                    self._rss_max = rss
            if now - self._system_at >= THROTTLE_SECONDS or (
                abs(rss - self._system_rss) >= _RSS_MOVE_BYTES
            ):
                self._read_system(rss, now)
            hwm = self._hwm
            peak = None if hwm is None else max(hwm, self._rss_max)
            total, available, current = self._total, self._available, self._current
        if self._cgroup_limit is not None and current is not None:
            limit = min(self._cgroup_limit, total) if total is not None else self._cgroup_limit
            free = max(limit - current, 0)
            if available is not None:
                free = min(free, available)
            total, available = limit, free
        used_bytes = total - available if total is not None and available is not None else None
        return DeviceMemory(
            device="cpu",
            used_bytes=used_bytes,
            free_bytes=available,
            total_bytes=total,
            process_used_bytes=rss,
            process_peak_bytes=peak,
        )

    def _read_system(self, rss: int, now: float) -> None:
        """Re-read the system-wide fields (caller holds the lock)."""
        meminfo = os.pread(self._meminfo, 8192, 0)
        self._available = _field_kib(meminfo, b"MemAvailable:")
        fd = self._cgroup_current
        self._current = int(os.pread(fd, 64, 0)) if fd >= 0 else None
        self._system_at, self._system_rss = now, rss


def _psutil_rss(pid: int) -> int | None:
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.NoSuchProcess:
        return 0
    except psutil.Error:
        return None


def _field_kib(blob: bytes, key: bytes) -> int | None:
    start = blob.find(key)
    if start < 0:
        return None
    end = blob.find(b"kB", start)
    return int(blob[start + len(key) : end]) * _KIB


def _cgroup_dir() -> str:
    """This process's cgroup v2 directory (``/sys/fs/cgroup`` plus its path)."""
    try:
        with open("/proc/self/cgroup", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("0::"):
                    return "/sys/fs/cgroup" + line[3:].strip().rstrip("/")
    except OSError:
        pass
    return "/sys/fs/cgroup"


def _cgroup_limit(directory: str) -> int | None:
    """The memory limit in bytes of cgroup v2 ``directory``, or ``None`` when there is none."""
    try:
        with open(directory + "/memory.max", encoding="ascii") as fh:
            text = fh.read().strip()
        if text == "max" or not os.path.exists(directory + "/memory.current"):
            return None
        return int(text)
    except (OSError, ValueError):
        return None


class CpuBackend(BackendBase):
    """Host memory: process RSS (and its peak), system or cgroup total and available.

    ``allocated_bytes`` and ``reserved_bytes`` are ``None``: torch's CPU
    allocator keeps no counters. Use :func:`vramkit.live_tensors` for the bytes
    held by live CPU tensors.
    """

    kind = "cpu"
    indexed = False
    host = True

    def __init__(self) -> None:
        self._proc = _ProcReader() if sys.platform.startswith("linux") else None
        self._process: psutil.Process | None = None

    def is_available(self) -> bool:
        """Host memory is always there."""
        return True

    def device_count(self) -> int:
        """One host."""
        return 1

    def read(self, index: int = 0) -> DeviceMemory:
        """Read host memory.

        Args:
            index: Ignored: there is one host.

        Returns:
            RSS and peak RSS as ``process_*``, system (or cgroup) memory as
            ``used_bytes`` / ``free_bytes`` / ``total_bytes``, in bytes.
        """
        if self._proc is not None:
            try:
                return self._proc.read()
            except OSError:
                self._proc = None  # /proc not mounted (some sandboxes): fall back
        if self._process is None or self._process.pid != os.getpid():
            self._process = psutil.Process()
        info = self._process.memory_info()
        system = psutil.virtual_memory()
        peak = getattr(info, "peak_wset", None)  # Windows tracks a peak
        return DeviceMemory(
            device="cpu",
            used_bytes=system.total - system.available,
            free_bytes=system.available,
            total_bytes=system.total,
            process_used_bytes=info.rss,
            process_peak_bytes=peak,
        )

    def read_process(self, index: int, pid: int) -> int | None:
        """Resident bytes of process ``pid`` (another process: a worker), 0 once it is gone.

        Args:
            index: Ignored: there is one host.
            pid: The process.

        Returns:
            Its resident set size in bytes; 0 when no such process exists (its
            memory is the operating system's again); ``None`` when it cannot be
            read (another user's process on a hardened ``/proc``).
        """
        try:
            with open(f"/proc/{pid}/status", "rb") as fh:
                status = fh.read()
        except (FileNotFoundError, ProcessLookupError):
            if os.path.isdir("/proc/self"):
                return 0  # /proc is there and the process is not: it is gone
            return _psutil_rss(pid)  # no /proc (macOS, Windows)
        except OSError:
            return None
        if b"\nState:\tZ" in status:
            return 0  # a zombie: it exited, only its exit status is left
        return _field_kib(status, b"VmRSS:") or 0

    def empty_cache(self, index: int = 0) -> None:
        """Give freed heap pages back to the OS (``malloc_trim(0)`` on glibc)."""
        malloc_trim()

    def clean(self, index: int = 0) -> None:
        """Nothing per device: the host's cache is the heap, which a cleanup trims once for all."""

    def synchronize(self, index: int = 0) -> None:
        """Nothing to wait for on the host."""

    def reset_peak(self, index: int = 0) -> None:
        """Reset the peak resident set size (Linux ``/proc/self/clear_refs``), where allowed."""
        if not sys.platform.startswith("linux"):
            return
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
                fh.write("5")
        except OSError:
            pass  # read-only /proc: the peak stays the lifetime peak
        if self._proc is not None:
            self._proc.forget_peak()


_libc_lock = threading.Lock()
_malloc_trim: Any = None  # the ctypes function, once looked up
_malloc_trim_looked_up = False


def malloc_trim() -> bool:
    """Ask glibc to return free heap memory to the OS.

    Returns:
        ``True`` when ``malloc_trim(0)`` ran (glibc), ``False`` where it does
        not exist (macOS, Windows, musl).
    """
    global _malloc_trim, _malloc_trim_looked_up
    with _libc_lock:
        if not _malloc_trim_looked_up:
            _malloc_trim_looked_up = True
            if sys.platform.startswith("linux"):
                try:
                    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
                    function = libc.malloc_trim
                    function.argtypes = [ctypes.c_size_t]
                    function.restype = ctypes.c_int
                    _malloc_trim = function
                except (OSError, AttributeError):
                    _malloc_trim = None
        function = _malloc_trim
    if function is None:
        return False
    function(0)
    return True
