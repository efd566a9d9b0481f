"""The cross-process view: each process publishes its models where ``vramkit ps`` reads them.

Every process that uses vramkit writes one small JSON record, ``<pid>.json``,
into a per-user runtime directory: ``$VRAMKIT_RUNTIME_DIR`` if set, else
``$XDG_RUNTIME_DIR/vramkit``, else ``/dev/shm/vramkit-<uid>`` (memory, where
the system has one), else ``/tmp/vramkit-<uid>``. The record is
rewritten on every model transition (it subscribes to :mod:`vramkit.events`,
never to leases, so a lease costs nothing more), refreshed every
:data:`REFRESH_SECONDS` while models are alive so lease counts and idle times
stay close to the truth, and removed at exit. ``VRAMKIT_PUBLISH=0`` turns
publishing off.

Nothing here trusts what another user could plant: the directory must be a
real directory (not a link) owned by this user with no access for anyone else
(one this user owns is tightened to 0700; anyone else's is refused), records
are opened without following links and read only when this user owns them,
and a record whose process is gone (or whose PID now names a different
process) is ignored and removed. Writes are atomic: a private temporary file
renamed over the record, so a reader sees the old record or the new one.

This module imports nothing of vramkit above :mod:`vramkit.events`: what to
publish comes from a ``describe`` callable that :mod:`vramkit.model`
installs.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import json
import logging
import os
import re
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vramkit import events
from vramkit._keepalive import KeepAliveScheduler
from vramkit._version import __version__

__all__ = [
    "REFRESH_SECONDS",
    "ProcessRecord",
    "advertise_admin",
    "install",
    "pid_alive",
    "publisher",
    "read_records",
    "runtime_dir",
]

_log = logging.getLogger("vramkit.runtime")

REFRESH_SECONDS = 2.0
"""While models are alive, the record is rewritten this often (lease counts, idle times)."""

_FORMAT = 1
_MAX_RECORD_BYTES = 1 << 20  # a record lists a handful of models: anything larger is not ours
_RECORD = re.compile(r"^(\d+)\.json$")
_TEMPORARY = re.compile(r"^\.(\d+)\..*\.tmp$")


# ---------------------------------------------------------------------- the directory


def runtime_dir(*, create: bool = False) -> Path:
    """The per-user directory records live in, checked (and made, with ``create``).

    Returns:
        The directory: owned by this user, mode 0700, not a symbolic link.

    Raises:
        PermissionError: It exists but belongs to someone else, or is a link
            or not a directory.
        FileNotFoundError: It does not exist (and ``create`` is false), or its
            parent does not.
    """
    path = _configured_dir()
    if create:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path, 0o700)
    _check_private_dir(path)
    return path


_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _settings() -> tuple[str | None, str | None]:
    """What :func:`_configured_dir` depends on: the two environment variables."""
    return os.environ.get("VRAMKIT_RUNTIME_DIR"), os.environ.get("XDG_RUNTIME_DIR")


def _configured_dir() -> Path:
    override = os.environ.get("VRAMKIT_RUNTIME_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "vramkit"
    # Memory-backed where the system has it: a rename over a record on a disk
    # file system costs milliseconds (ext4 flushes the data first), on tmpfs µs.
    shared = "/dev/shm"
    base = shared if os.path.isdir(shared) else tempfile.gettempdir()
    return Path(base) / f"vramkit-{_uid()}"


def _uid() -> int:
    getuid = getattr(os, "getuid", None)
    return getuid() if getuid is not None else 0  # Windows: no owners to compare


def _check_private_dir(path: Path) -> None:
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(
            f"the vramkit runtime directory {path} is not a directory (a link or a file?): "
            "refusing to use it; remove it or set VRAMKIT_RUNTIME_DIR"
        )
    if info.st_uid != _uid():
        raise PermissionError(
            f"the vramkit runtime directory {path} belongs to uid {info.st_uid}, not to this "
            f"user (uid {_uid()}): refusing to use it; set VRAMKIT_RUNTIME_DIR to a directory "
            "of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)  # ours: nobody else may read or plant records


# ---------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """What one process published about itself.

    Attributes:
        pid: Its process id.
        started: When it started (seconds since the epoch), to tell a reused PID apart.
        updated: When the record was written (seconds since the epoch).
        command: Its command line, shortened.
        vramkit: The vramkit version it runs.
        admin_url: Where its HTTP admin API answers, if it serves one.
        models: One dict per model, as ``ManagedModel.to_dict()`` gives.
        pools: One dict per pool (its status without the model lines).
    """

    pid: int
    started: float
    updated: float
    command: str
    vramkit: str
    admin_url: str | None = None
    models: tuple[Mapping[str, Any], ...] = ()
    pools: tuple[Mapping[str, Any], ...] = field(default_factory=tuple)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ProcessRecord:
        """Rebuild a record from its JSON form.

        Raises:
            ValueError: A field is missing or has the wrong type.
        """
        try:
            record = cls(
                pid=int(data["pid"]),
                started=float(data["started"]),
                updated=float(data["updated"]),
                command=str(data["command"]),
                vramkit=str(data["vramkit"]),
                admin_url=None if data.get("admin_url") is None else str(data["admin_url"]),
                models=tuple(dict(m) for m in data.get("models", ())),
                pools=tuple(dict(p) for p in data.get("pools", ())),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a vramkit process record: {exc}") from None
        return record

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready data."""
        return {
            "format": _FORMAT,
            "pid": self.pid,
            "started": self.started,
            "updated": self.updated,
            "command": self.command,
            "vramkit": self.vramkit,
            "admin_url": self.admin_url,
            "models": [dict(m) for m in self.models],
            "pools": [dict(p) for p in self.pools],
        }

    def idle_seconds(self, model: Mapping[str, Any], now: float | None = None) -> float | None:
        """A model's idle time now: what was published plus the time since."""
        idle = model.get("idle_seconds")
        if idle is None:
            return None
        now = time.time() if now is None else now
        return float(idle) + max(now - self.updated, 0.0)


def read_records(*, sweep: bool = True) -> list[ProcessRecord]:
    """Every live process's record, oldest process first.

    Args:
        sweep: Remove the records (and half-written files) of processes that
            are gone.

    Returns:
        The records; an empty list when the directory does not exist yet.

    Raises:
        PermissionError: The directory is not this user's (see :func:`runtime_dir`).
    """
    try:
        directory = runtime_dir()
    except FileNotFoundError:
        return []
    records = []
    for entry in os.scandir(directory):
        record_match = _RECORD.match(entry.name)
        temporary = _TEMPORARY.match(entry.name)
        if temporary is not None:
            if sweep and not pid_alive(int(temporary.group(1))):
                _unlink(entry.path)
            continue
        if record_match is None:
            continue
        record = _read_record(entry.path, int(record_match.group(1)))
        if record is None:
            continue
        if pid_alive(record.pid, started=record.started):
            records.append(record)
        elif sweep:
            _unlink(entry.path)
    return sorted(records, key=lambda r: (r.started, r.pid))


def _read_record(path: str, pid: int) -> ProcessRecord | None:
    """The record at ``path`` if this user wrote it and it names process ``pid``."""
    try:
        fd = os.open(path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ENOENT, errno.ELOOP):  # gone since listed; a link
            _log.debug("cannot open %s: %s", path, exc)
        return None
    try:
        info = os.fstat(fd)
        if (
            not stat.S_ISREG(info.st_mode)
            or info.st_uid != _uid()
            or info.st_size > _MAX_RECORD_BYTES
        ):
            return None
        blob = os.read(fd, _MAX_RECORD_BYTES + 1)
    finally:
        os.close(fd)
    try:
        record = ProcessRecord.from_dict(json.loads(blob))
    except ValueError as exc:  # half a file from a crashed writer, or not ours
        _log.debug("ignoring %s: %s", path, exc)
        return None
    return record if record.pid == pid else None


def pid_alive(pid: int, *, started: float | None = None) -> bool:
    """Whether process ``pid`` runs (and, given ``started``, is the one that started then).

    A zombie (killed, not yet reaped by its parent) counts as gone.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        # create_time() is rounded differently by the kernel's clock ticks: allow a second.
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # exists, someone else's
        return started is None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ---------------------------------------------------------------------- publishing


class Publisher:
    """Writes this process's record on every transition (an events subscriber).

    Args:
        describe: Returns ``{"models": [...], "pools": [...]}`` for this process.
        clock: Monotonic seconds for the refresh timer (tests drive it).
        start: Run the refresh timer on a thread (``False``: call :meth:`run_due`).
    """

    def __init__(
        self,
        describe: Callable[[], Mapping[str, Any]],
        *,
        clock: Callable[[], float] = time.monotonic,
        start: bool = True,
    ) -> None:
        self._describe = describe
        self._clock = clock
        self._start = start
        self._admin_url: str | None = None
        self._closed = False
        self._forked()

    def _forked(self) -> None:
        """(Re)initialise per-process state: at creation and in a forked child."""
        import psutil

        self._pid = os.getpid()
        process = psutil.Process(self._pid)
        self._started = process.create_time()
        try:
            command = " ".join(" ".join(process.cmdline()).split())  # one line, however written
        except psutil.Error:
            command = " ".join(sys.argv)
        self._command = command if len(command) <= 200 else command[:199] + "…"
        self._lock = threading.Lock()  # a lock held by another thread at fork stays held
        self._sequence = 0
        self._written_sequence = 0
        self._path: Path | None = None  # the record written, to remove at exit
        self._refresh_pending = False
        self._refresher = KeepAliveScheduler(
            "vramkit-publish", clock=self._clock, start=self._start
        )
        # The directory settings last checked, and the files they gave (None: refused).
        self._settings: tuple[str | None, str | None] | None = None
        self._temporary = ""
        self._target: str | None = None

    @property
    def path(self) -> Path | None:
        """The record this process wrote, if any."""
        return self._path

    def advertise(self, url: str | None) -> None:
        """Publish (or, with ``None``, withdraw) where this process's admin API answers."""
        self._admin_url = url
        self.publish(force=True)

    def __call__(self, event: events.Event) -> None:
        """The events subscriber: a transition happened, publish."""
        self.publish()

    def publish(self, *, force: bool = False) -> bool:
        """Write the record now.

        Args:
            force: Write even when this process has no models and never wrote.

        Returns:
            Whether a record was written.
        """
        if self._closed or not _enabled():
            return False
        if os.getpid() != self._pid:
            self._forked()
        with self._lock:
            self._sequence += 1
            sequence = self._sequence
        # Described outside the lock: describing takes pool and model locks, and a
        # transition's event may come from a thread that holds one of them.
        state = self._describe()
        models = list(state.get("models", ()))
        if not (models or force or self._path is not None or self._admin_url is not None):
            return False
        record = ProcessRecord(
            pid=self._pid,
            started=self._started,
            updated=time.time(),
            command=self._command,
            vramkit=__version__,
            admin_url=self._admin_url,
            models=tuple(models),
            pools=tuple(state.get("pools", ())),
        )
        blob = json.dumps(record.to_dict(), separators=(",", ":")).encode()
        with self._lock:
            if sequence < self._written_sequence:
                return False  # a later transition's record is already there
            written = self._write(blob)
            if written:
                self._written_sequence = sequence
        if written and models:
            self._schedule_refresh()
        return written

    def _write(self, blob: bytes) -> bool:
        """Atomically replace this process's record (caller holds the lock)."""
        settings = _settings()
        if settings != self._settings:
            self._prepare(settings)
        if self._target is None:
            return False  # this directory was refused; said once, when it was
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | _NOFOLLOW | _CLOEXEC
        try:
            fd = os.open(self._temporary, flags, 0o600)
            try:
                try:
                    view = memoryview(blob)
                    while view:  # a write to a file may be partial
                        view = view[os.write(fd, view) :]
                finally:
                    os.close(fd)
                os.replace(self._temporary, self._target)
            except BaseException:
                _unlink(self._temporary)
                raise
        except OSError as exc:
            _log.warning("vramkit ps will not list this process: %s", exc)
            self._target = None
            return False
        self._path = Path(self._target)
        return True

    def _prepare(self, settings: tuple[str | None, str | None]) -> None:
        """Check (and make) the directory the settings name; sweep it the first time."""
        self._settings = settings
        self._target = None
        try:
            directory = runtime_dir(create=True)
        except OSError as exc:
            _log.warning("vramkit ps will not list this process: %s", exc)
            return
        # One writer per process (the caller holds the lock): a fixed temporary name will do.
        self._temporary = str(directory / f".{self._pid}.record.tmp")
        self._target = str(directory / f"{self._pid}.json")
        _sweep_once(directory)

    def _schedule_refresh(self) -> None:
        with self._lock:
            if self._refresh_pending:
                return
            self._refresh_pending = True
        self._refresher.schedule(self, REFRESH_SECONDS, 0)

    def _expire(self, stamp: int) -> None:
        """The refresh timer fired (the scheduler's protocol): publish again."""
        with self._lock:
            self._refresh_pending = False
        self.publish()

    def run_due(self) -> int:
        """Run a due refresh now, in this thread (for ``start=False``)."""
        return self._refresher.run_due()

    def close(self) -> None:
        """Stop publishing and remove this process's record (registered at exit)."""
        self._closed = True
        self._refresher.close(timeout=1.0)
        path, self._path = self._path, None
        if path is not None and os.getpid() == self._pid:
            _unlink(str(path))


def _enabled() -> bool:
    return os.environ.get("VRAMKIT_PUBLISH", "1").strip().lower() not in ("0", "false", "no", "off")


_swept: set[Path] = set()


def _sweep_once(directory: Path) -> None:
    """Remove records of dead processes once per directory, when this process first writes."""
    if directory in _swept:
        return
    _swept.add(directory)
    try:
        read_records(sweep=True)
    except OSError as exc:
        _log.debug("sweeping %s failed: %s", directory, exc)


_publisher: Publisher | None = None
_install_lock = threading.Lock()


def install(describe: Callable[[], Mapping[str, Any]]) -> Publisher:
    """Start publishing this process's state on every transition (once per process).

    Args:
        describe: Returns ``{"models": [...], "pools": [...]}``.

    Returns:
        The process's publisher.
    """
    global _publisher
    with _install_lock:
        if _publisher is None:
            _publisher = Publisher(describe)
            events.subscribe(_publisher)
            atexit.register(_publisher.close)
        return _publisher


def publisher() -> Publisher | None:
    """This process's publisher, once :func:`install` ran."""
    return _publisher


def advertise_admin(url: str | None) -> None:
    """Publish where this process's admin API answers (``None`` withdraws it).

    ``vramkit free PID|NAME`` and ``vramkit ps`` use it to reach the service.
    Publishing must have been installed (importing :mod:`vramkit.model` does).
    """
    if _publisher is not None:
        _publisher.advertise(url)
