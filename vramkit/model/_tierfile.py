"""The disk tier's file: its format, its private folder, what a wake trusts, and the sweep.

A model offloaded to ``disk`` writes its weights once to a safetensors file
whose every tensor starts on a 64-byte boundary (see
:func:`write_aligned_safetensors`).

Where: never in the offload directory itself, but in a subdirectory of its
own, ``vramkit-<uid>``, made ``0700`` and refused when another user owns it or
others can write to it (what pytest's ``tmp_path`` does). Every operation goes
through a descriptor of that checked subdirectory, opened without following
links, so renaming paths behind vramkit's back changes nothing, and the
directory around it may be shared. Files are created ``0600`` with
``O_EXCL | O_NOFOLLOW`` under unpredictable names, and opened again only with
``O_NOFOLLOW | O_NONBLOCK`` and only if they are regular files.

What a wake trusts: the file it wrote, unchanged. The file's identity
(device, inode, size, modification and change times, recorded right after it
was written) must match, and every tensor's dtype, shape and place in the
file must match what the model had when it was offloaded; anything else is
refused, and the model falls back to its loader. A SHA-256 digest of every
tensor is recorded at write time; it decides whether a woken model is
unchanged and its file can be kept for the next offload (the check reads the
weights once, which the benchmark shows against rewriting).

The sweep: a process holds an exclusive ``flock`` on a lock file of its own in
the subdirectory for as long as it has files there; every file it writes
carries its random token. A process that finds a lock it can take (its holder
is gone, even a PID 1 in a container) removes that token's files. Files not
named that way are never touched. Files are also removed when the model wakes
for good or unloads, and at interpreter exit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import hashlib
import json
import mmap
import os
import re
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from vramkit._units import format_bytes
from vramkit._utils import user_cache_dir
from vramkit.errors import OffloadError

__all__ = [
    "ALIGNMENT",
    "PAD_PREFIX",
    "TierFile",
    "UntrustedFileError",
    "default_offload_dir",
    "forget",
    "read_file",
    "tensor_digests",
    "write_aligned_safetensors",
    "write_file",
]

ALIGNMENT = 64
"""Byte alignment of every tensor in the disk tier's file (and so in its mapping)."""

PAD_PREFIX = "__vramkit_pad_"
"""Names of the padding entries between tensors (not weights: skipped on load)."""

_POSIX = os.name == "posix" and os.open in os.supports_dir_fd
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_TOKEN = re.compile(r"^\.?([0-9a-f]{32})[-.]")


class UntrustedFileError(OSError):
    """The tier file is not the one vramkit wrote (changed, replaced, not a regular file)."""


def default_offload_dir() -> Path:
    """Where disk-tier files go: ``$VRAMKIT_CACHE_DIR``, else the user cache dir + ``offload``.

    vramkit writes in a private subdirectory of it (``vramkit-<uid>``).
    """
    override = os.environ.get("VRAMKIT_CACHE_DIR")
    return Path(override).expanduser() if override else user_cache_dir() / "offload"


# ---------------------------------------------------------------------- the private directory


def _euid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else 0


class _TierDir:
    """vramkit's own subdirectory of one offload directory, checked, open and locked.

    Opened on the first write there and kept while this process has files in
    it; closing it (the last file gone) releases the lock and removes the lock file.
    """

    def __init__(self, base: Path) -> None:
        self.base = base
        self.path = base / f"vramkit-{_euid()}"
        self.token = secrets.token_hex(16)
        self.files: set[str] = set()
        self.fd = _open_private_dir(base, self.path.name)
        self.lock_fd = -1
        try:
            _sweep(self)
            self.lock_fd = _take_lock(self)
        except BaseException:
            self.close()
            raise

    # path-like operations on names inside the directory (through its descriptor)

    def open(self, name: str, flags: int, mode: int = 0o600) -> int:
        if _POSIX:
            return os.open(name, flags | _CLOEXEC, mode, dir_fd=self.fd)
        return os.open(self.path / name, flags, mode)

    def lstat(self, name: str) -> os.stat_result:
        if _POSIX:
            return os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        return os.lstat(self.path / name)

    def unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            if _POSIX:
                os.unlink(name, dir_fd=self.fd)
            else:
                os.unlink(self.path / name)

    def replace(self, source: str, target: str) -> None:
        if _POSIX:
            os.replace(source, target, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        else:
            os.replace(self.path / source, self.path / target)

    def names(self) -> list[str]:
        return os.listdir(self.fd if _POSIX else self.path)

    def free_bytes(self) -> int | None:
        try:
            stats = os.fstatvfs(self.fd) if _POSIX else os.statvfs(self.path)
        except (OSError, AttributeError):
            return None
        return stats.f_bavail * stats.f_frsize

    def close(self) -> None:
        """Release the lock and remove the lock file.

        The (empty) directory stays: removing it could pull it from under
        another process that has just opened it and not yet locked.
        """
        if self.lock_fd >= 0:
            self.unlink(f"{self.token}.lock")
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)  # releases the flock
            self.lock_fd = -1
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def _open_private_dir(base: Path, name: str) -> int:
    """Make or open ``base/name``, refusing it unless this user alone can write to it.

    Raises:
        OffloadError: The directory (or the one around it) is not trustworthy.
        OSError: It could not be made or opened.
    """
    base.mkdir(parents=True, exist_ok=True)
    if not _POSIX:
        (base / name).mkdir(mode=0o700, exist_ok=True)
        return -1
    # The folder around may be shared (a team directory, /tmp): what matters is
    # the subdirectory, opened without following links and checked through its
    # descriptor, which a rename of paths behind our back cannot swap.
    outer = os.open(base, os.O_RDONLY | _DIRECTORY | _CLOEXEC)
    try:
        fd = _make_and_open(outer, base / name)
    finally:
        os.close(outer)
    try:
        _check_private(fd, base / name)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _make_and_open(outer: int, path: Path) -> int:
    with contextlib.suppress(FileExistsError):
        os.mkdir(path.name, 0o700, dir_fd=outer)
    try:
        return os.open(path.name, os.O_RDONLY | _DIRECTORY | _NOFOLLOW | _CLOEXEC, dir_fd=outer)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            raise OffloadError(
                f"{path} is not a directory (a symlink or a file planted there?); "
                "vramkit will not write through it",
                errno=exc.errno,
            ) from exc
        raise


def _check_private(fd: int, path: Path) -> None:
    found = os.fstat(fd)
    if found.st_uid != _euid():
        raise OffloadError(
            f"{path} is owned by uid {found.st_uid}, not by this user ({_euid()}): "
            "vramkit will not write weights where someone else controls the files"
        )
    mode = stat.S_IMODE(found.st_mode)
    if mode & 0o022:
        raise OffloadError(
            f"{path} is writable by others (mode {mode:o}): files could have been planted in "
            "it; remove it (vramkit makes it again, private) or fix its mode to 700"
        )
    if mode & 0o077:
        os.fchmod(fd, 0o700)  # readable by others: our weights are not theirs to read


def _take_lock(directory: _TierDir) -> int:
    """Create this process's lock file and hold an exclusive flock on it while we live."""
    if not _POSIX:
        return -1
    import fcntl

    fresh = f".{directory.token}.lock-new"
    for attempt in range(3):
        fd = directory.open(fresh, os.O_RDWR | os.O_CREAT | os.O_EXCL | _NOFOLLOW)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # Only now does it get the name sweepers take for proof of life.
            directory.replace(fresh, f"{directory.token}.lock")
        except FileNotFoundError:
            # A sweeper took our fresh file for a dead process's in the instant
            # before we locked it, and removed it: start again.
            os.close(fd)
            if attempt == 2:
                raise
            continue
        except BaseException:
            directory.unlink(fresh)
            os.close(fd)
            raise
        return fd
    raise AssertionError("unreachable")  # pragma: no cover


def _sweep(directory: _TierDir) -> None:
    """Remove the files of processes that died without cleaning up (killed by a signal).

    A process's files carry its token, and it holds the flock on
    ``<token>.lock`` (``.<token>.lock-new`` while it starts) as long as it
    lives; a lock that can be taken means its holder is gone. Files whose token
    has no lock file at all are a dead process's too (the lock goes last).
    Nothing else in the folder is touched.
    """
    if not _POSIX:
        return
    names = directory.names()
    tokens = {m.group(1) for n in names if (m := _TOKEN.match(n))} - {directory.token}
    for token in tokens:
        locks = [n for n in (f"{token}.lock", f".{token}.lock-new") if n in names]
        if not all(_holder_gone(directory, lock) for lock in locks):
            continue
        for name in names:
            match = _TOKEN.match(name)
            if match is not None and match.group(1) == token:
                _remove_ours(directory, name)


def _holder_gone(directory: _TierDir, lock: str) -> bool:
    import fcntl

    try:
        fd = directory.open(lock, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        return True  # its owner removed it while closing: its files went first
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False  # held: its process is alive
        return True
    finally:
        os.close(fd)  # our flock (if any) goes with it


def _remove_ours(directory: _TierDir, name: str) -> None:
    with contextlib.suppress(OSError):
        found = directory.lstat(name)
        if stat.S_ISREG(found.st_mode) and found.st_uid == _euid():
            directory.unlink(name)


_dirs: dict[Path, _TierDir] = {}
_dirs_lock = threading.RLock()


def _reserve(base: Path) -> tuple[_TierDir, str]:
    """The private directory of ``base`` and a fresh partial-file name, counted as its file.

    Counted at once, under the lock, so another thread forgetting the last
    file there does not close the directory under this write.
    """
    key = Path(os.path.abspath(base))
    with _dirs_lock:
        directory = _dirs.get(key)
        if directory is None:
            directory = _dirs[key] = _TierDir(key)
        elif _POSIX:
            _check_private(directory.fd, directory.path)  # still ours alone? (one fstat)
        partial = f".{directory.token}-{secrets.token_hex(8)}.partial"
        directory.files.add(partial)
        return directory, partial


def _release(directory: _TierDir, name: str) -> None:
    """Forget a file of ``directory``; the last one closes it (lock released, lock file gone)."""
    with _dirs_lock:
        directory.files.discard(name)
        if not directory.files and _dirs.get(directory.base) is directory:
            del _dirs[directory.base]
            directory.close()


@atexit.register
def _remove_leftover_files() -> None:
    with _dirs_lock:
        directories = list(_dirs.values())
        _dirs.clear()
    for directory in directories:
        for name in list(directory.files):
            directory.unlink(name)
        directory.close()


def _forget_parent_files() -> None:
    # A forked child must not remove (or keep locked) what its parent wrote:
    # the parent removes its own files; the child only closes its copies.
    with _dirs_lock:
        directories = list(_dirs.values())
        _dirs.clear()
    for directory in directories:
        for fd in (directory.lock_fd, directory.fd):
            with contextlib.suppress(OSError):
                if fd >= 0:
                    os.close(fd)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_files)


# ---------------------------------------------------------------------- one file


_Identity = tuple[int, int, int, int, int]


@dataclass(frozen=True, slots=True)
class _Entry:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # offset in the file of its first byte
    nbytes: int


@dataclass(slots=True)
class TierFile:
    """A file the disk tier wrote, and what it takes to trust it again.

    Attributes:
        directory: The private directory it lives in.
        name: Its name there.
        identity: Device, inode, size, modification and change times (ns)
            right after it was written.
        entries: Each tensor's dtype, shape and place in the file, by key.
        digests: SHA-256 of each tensor's bytes, by key, computed while writing.
    """

    directory: _TierDir
    name: str
    identity: _Identity
    entries: dict[str, _Entry]
    digests: dict[str, bytes] = field(repr=False)

    @property
    def path(self) -> Path:
        """Where the file is (for reports and people; vramkit goes through the directory)."""
        return self.directory.path / self.name

    def intact(self) -> bool:
        """Whether the file is still the one written: there, regular, identity unchanged."""
        try:
            found = self.directory.lstat(self.name)
        except OSError:
            return False
        return stat.S_ISREG(found.st_mode) and _identity(found) == self.identity


def _identity(found: os.stat_result) -> _Identity:
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns, found.st_ctime_ns)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "model"


def write_file(
    name: str, tensors: Mapping[str, torch.Tensor], weight_bytes: int, base: Path
) -> TierFile:
    """Write the disk tier's file for model ``name`` in ``base``'s private subdirectory.

    Raises:
        OffloadError: The file could not be written, or the directory is not
            trustworthy; nothing is left behind. ``errno`` is the OS's when it
            refused (``ENOSPC``, ``EFBIG``...).
    """
    directory: _TierDir | None = None
    partial = final = ""
    try:
        directory, partial = _reserve(base)
        free = directory.free_bytes()
        if free is not None and free < weight_bytes:
            need = format_bytes(weight_bytes)
            raise OSError(
                errno.ENOSPC, f"{format_bytes(free)} free in {directory.path}, {need} needed"
            )
        final = f"{directory.token}-{_safe_name(name)}-{secrets.token_hex(8)}.safetensors"
        fd = directory.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW)
        with os.fdopen(fd, "wb") as fh:
            entries, digests = _write(fh, tensors, {"vramkit_model": name})
        if directory.lstat(partial).st_size < weight_bytes:
            raise OSError(errno.EIO, f"short write: fewer than {weight_bytes} bytes")
        with _dirs_lock:
            directory.files.add(final)
            directory.replace(partial, final)
            directory.files.discard(partial)
        identity = _identity(directory.lstat(final))
    except Exception as exc:
        if directory is not None:
            _abandon(directory, [partial, final])
        where = base if directory is None else directory.path
        # Blame the disk only for what the disk did: any other error is named
        # by its type, not dressed up as a full or unwritable directory.
        cause = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        what = "could not write" if isinstance(exc, OSError) else "failed while writing"
        raise OffloadError(
            f"{name}: {what} the disk tier to {where} ({cause}); "
            "the model is still loaded and nothing was lost",
            errno=getattr(exc, "errno", None),
        ) from exc
    return TierFile(directory, final, identity, entries, digests)


def _abandon(directory: _TierDir, names: list[str]) -> None:
    """Remove what a failed write left (all of it before the directory may close)."""
    with _dirs_lock:
        mine = [name for name in names if name in directory.files]
        for name in mine:
            directory.unlink(name)
        for name in mine:
            _release(directory, name)


def forget(file: TierFile | None) -> None:
    """Remove a tier file now (a no-op for ``None`` or a file already forgotten)."""
    if file is None:
        return
    with _dirs_lock:
        if file.name not in file.directory.files:
            return
        file.directory.unlink(file.name)
        _release(file.directory, file.name)


_SAFETENSORS_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    **{
        getattr(torch, name): code
        for name, code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"))
        if hasattr(torch, name)
    },
}


def write_aligned_safetensors(
    path: Path, tensors: Mapping[str, torch.Tensor], *, metadata: Mapping[str, str]
) -> None:
    """Write a safetensors file whose every tensor starts on a 64-byte boundary.

    A mapped tensor's address decides which BLAS kernel runs, and kernels for
    differently aligned data add in a different order: weights woken from an
    8-byte-aligned file can give outputs that differ in the last bits. Gaps are
    filled with small ``U8`` padding entries (skipped on load), so the file
    stays a valid safetensors file any reader accepts. Tensors are copied to
    host one at a time, so a GPU model never needs its whole size in host RAM.

    Raises:
        OSError: The file could not be written.
        TypeError: A dtype safetensors cannot store (complex numbers).
    """
    with open(path, "wb") as fh:
        _write(fh, tensors, metadata)


def _write(
    fh: IO[bytes], tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]
) -> tuple[dict[str, _Entry], dict[str, bytes]]:
    """Write the aligned file to ``fh``, fsync it; return each tensor's entry and digest."""
    layout: dict[str, Any] = {"__metadata__": dict(metadata)}
    order: list[tuple[str, torch.Tensor | int]] = []
    offset = 0
    for index, (key, tensor) in enumerate(tensors.items()):
        code = _SAFETENSORS_DTYPES.get(tensor.dtype)
        if code is None:
            raise TypeError(f"{key}: safetensors cannot store {tensor.dtype}")
        if offset % ALIGNMENT:
            pad = ALIGNMENT - offset % ALIGNMENT
            layout[f"{PAD_PREFIX}{index}"] = {
                "dtype": "U8",
                "shape": [pad],
                "data_offsets": [offset, offset + pad],
            }
            order.append((f"{PAD_PREFIX}{index}", pad))
            offset += pad
        size = tensor.numel() * tensor.element_size()
        layout[key] = {
            "dtype": code,
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        order.append((key, tensor))
        offset += size
    header = json.dumps(layout, separators=(",", ":")).encode("utf-8")
    # The data starts right after the 8-byte length and the header: pad the
    # header with spaces (allowed by the format) so that start is aligned too.
    header += b" " * (-(8 + len(header)) % ALIGNMENT)
    start = 8 + len(header)
    fh.write(len(header).to_bytes(8, "little"))
    fh.write(header)
    entries: dict[str, _Entry] = {}
    digests: dict[str, bytes] = {}
    for key, item in order:
        if isinstance(item, int):
            fh.write(b"\0" * item)
            continue
        host = _on_host(item)
        data = _raw_bytes(host)
        fh.write(data)
        digests[key] = hashlib.sha256(data).digest()
        begin = layout[key]["data_offsets"][0]
        entries[key] = _Entry(item.dtype, tuple(item.shape), start + begin, len(data))
        del data, host
    fh.flush()
    os.fsync(fh.fileno())
    return entries, digests


def _on_host(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().to("cpu").contiguous()


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A view of a contiguous CPU tensor's bytes, without a copy and without numpy.

    torch needs numpy for ``Tensor.numpy()`` and torch does not require numpy,
    so the bytes are read through ctypes at the tensor's address. The view is
    valid while ``tensor`` lives: the caller holds it until it is done with it.
    """
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B")


def tensor_digests(
    tensors: Mapping[str, torch.Tensor], stop: Callable[[str, bytes], bool] | None = None
) -> Iterator[tuple[str, bytes]]:
    """SHA-256 of each tensor's bytes, by key, as :func:`write_file` records them.

    Args:
        tensors: The tensors, by key.
        stop: Called with each key and digest; the iteration ends when it returns true.
    """
    for key, tensor in tensors.items():
        host = _on_host(tensor)
        digest = hashlib.sha256(_raw_bytes(host)).digest()
        del host
        yield key, digest
        if stop is not None and stop(key, digest):
            return


# ---------------------------------------------------------------------- reading it back


def read_file(
    file: TierFile, expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> dict[str, torch.Tensor]:
    """The tensors of a tier file, by key, mapped from the file (copy-on-write, lazy).

    The file is opened without following links and without blocking, and only
    trusted if it is the regular file vramkit wrote, unchanged (same identity),
    holding every expected key with the expected dtype and shape.

    Args:
        file: The file the offload wrote.
        expected: Every key's dtype and shape as the model had them at the offload.

    Raises:
        FileNotFoundError: The file was deleted.
        UntrustedFileError: It is not the file vramkit wrote, or its tensors
            are not what the model had at the offload.
        OSError: It could not be read.
    """
    try:
        fd = file.directory.open(file.name, os.O_RDONLY | _NOFOLLOW | _NONBLOCK)
    except FileNotFoundError:
        raise FileNotFoundError(f"cache file {file.path} was deleted") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UntrustedFileError(f"cache file {file.path} was replaced by a symlink") from exc
        raise
    try:
        found = os.fstat(fd)
        if not stat.S_ISREG(found.st_mode):
            raise UntrustedFileError(f"cache file {file.path} is no longer a regular file")
        if _identity(found) != file.identity:
            raise UntrustedFileError(
                f"cache file {file.path} changed since it was written (replaced or modified)"
            )
        _check_fits(file, expected)
        mapping = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY) if found.st_size else None
    finally:
        os.close(fd)  # the mapping stays valid without it
    return {key: _view(mapping, file.entries[key]) for key in expected}


def _check_fits(
    file: TierFile, expected: Mapping[str, tuple[torch.dtype, tuple[int, ...]]]
) -> None:
    for key, (dtype, shape) in expected.items():
        entry = file.entries.get(key)
        if entry is None:
            raise UntrustedFileError(f"cache file {file.path} lacks {key!r}")
        if entry.dtype != dtype or entry.shape != tuple(shape):
            raise UntrustedFileError(
                f"cache file {file.path}: {key!r} is {entry.dtype} {list(entry.shape)}, "
                f"the model expects {dtype} {list(shape)}"
            )


def _view(mapping: mmap.mmap | None, entry: _Entry) -> torch.Tensor:
    if entry.nbytes == 0 or mapping is None:
        return torch.empty(entry.shape, dtype=entry.dtype)
    raw = torch.frombuffer(mapping, dtype=torch.uint8, count=entry.nbytes, offset=entry.start)
    return raw.view(entry.dtype).view(entry.shape)
