"""The disk tier's file: its format, its folder, and removing it whatever happens.

A model offloaded to ``disk`` writes its weights once to a safetensors file
whose every tensor starts on a 64-byte boundary (see
:func:`write_aligned_safetensors`), in :func:`default_offload_dir`. Files are
removed when the model wakes for good or unloads, at interpreter exit, and,
for processes killed before their exit handlers ran, by the first process
that writes to the same folder afterwards.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from vramkit._runtime import pid_alive
from vramkit._units import format_bytes
from vramkit._utils import user_cache_dir
from vramkit.errors import OffloadError

__all__ = [
    "ALIGNMENT",
    "PAD_PREFIX",
    "default_offload_dir",
    "forget",
    "read_file",
    "remember",
    "write_aligned_safetensors",
    "write_file",
]

_files_lock = threading.Lock()
_files: set[Path] = set()


def default_offload_dir() -> Path:
    """Where disk-tier files go: ``$VRAMKIT_CACHE_DIR``, else the user cache dir + ``vramkit``."""
    override = os.environ.get("VRAMKIT_CACHE_DIR")
    return Path(override).expanduser() if override else user_cache_dir() / "offload"


def remember(path: Path) -> None:
    """Remove ``path`` at exit unless :func:`forget` removes it first."""
    with _files_lock:
        _files.add(path)


def forget(path: Path | None) -> None:
    """Remove a tier file now (a no-op for ``None`` or a file already gone)."""
    if path is None:
        return
    with _files_lock:
        _files.discard(path)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


_swept: set[Path] = set()
_LEFTOVER = re.compile(r"-(\d+)-[0-9a-f]+\.(safetensors|partial)$")


def _sweep_once(directory: Path) -> None:
    """Remove files left in ``directory`` by processes that died without cleaning up.

    Exit handlers remove a process's files, but a process killed by a signal
    never runs them. A file is only removed when the process id in its name is
    no longer running, once per directory per process.
    """
    with _files_lock:
        if directory in _swept:
            return
        _swept.add(directory)
    try:
        entries = list(directory.iterdir())
    except OSError:
        return
    for entry in entries:
        match = _LEFTOVER.search(entry.name)
        if match is None or int(match.group(1)) == os.getpid() or pid_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()


@atexit.register
def _remove_leftover_files() -> None:
    with _files_lock:
        leftovers = list(_files)
        _files.clear()
    for path in leftovers:
        with contextlib.suppress(OSError):
            path.unlink()


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "model"


def write_file(
    name: str, token: int, tensors: dict[str, torch.Tensor], weight_bytes: int, directory: Path
) -> Path:
    """Write the disk tier's file for model ``name`` (``token`` tells its models apart).

    The name carries this process's id, so a later process can sweep the files
    of one that died without cleaning up.

    Raises:
        OffloadError: The file could not be written (nothing is left behind).
    """
    final = directory / f"{_safe_name(name)}-{os.getpid()}-{token:x}.safetensors"
    partial = final.with_suffix(".partial")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _sweep_once(directory)
        if (free := _disk_free(directory)) is not None and free < weight_bytes:
            raise OSError(
                28, f"{format_bytes(free)} free in {directory}, {format_bytes(weight_bytes)} needed"
            )
        write_aligned_safetensors(partial, tensors, metadata={"vramkit_model": name})
        if partial.stat().st_size < weight_bytes:
            raise OSError(5, f"short write: {partial.stat().st_size} bytes of {weight_bytes}")
        os.replace(partial, final)
    except Exception as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        # Blame the disk only for what the disk did: any other error is named
        # by its type, not dressed up as a full or unwritable directory.
        cause = str(exc) if isinstance(exc, OSError) else f"{type(exc).__name__}: {exc}"
        what = "could not write" if isinstance(exc, OSError) else "failed while writing"
        raise OffloadError(
            f"{name}: {what} the disk tier to {directory} ({cause}); "
            "the model is still loaded and nothing was lost"
        ) from exc
    remember(final)
    return final


ALIGNMENT = 64
"""Byte alignment of every tensor in the disk tier's file (and so in its mapping)."""

PAD_PREFIX = "__vramkit_pad_"
"""Names of the padding entries between tensors (not weights: skipped on load)."""
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
    import json

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
    with open(path, "wb") as fh:
        fh.write(len(header).to_bytes(8, "little"))
        fh.write(header)
        for _, item in order:
            if isinstance(item, int):
                fh.write(b"\0" * item)
                continue
            host = item.detach().to("cpu").contiguous()
            fh.write(_raw_bytes(host))
            del host
        fh.flush()
        os.fsync(fh.fileno())


def _raw_bytes(tensor: torch.Tensor) -> memoryview:
    """A view of a contiguous CPU tensor's bytes, without a copy and without numpy.

    torch needs numpy for ``Tensor.numpy()`` and torch does not require numpy,
    so the bytes are read through ctypes at the tensor's address. The view is
    valid while ``tensor`` lives: the caller holds it until the write is done.
    """
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return memoryview(b"")
    return memoryview((ctypes.c_char * size).from_address(tensor.data_ptr())).cast("B")


def _disk_free(directory: Path) -> int | None:
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def read_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a tier file, by key, mapped from the file (padding entries dropped).

    Raises:
        FileNotFoundError: The file was deleted.
        MissingDependencyError: safetensors is not installed.
    """
    from vramkit._optional import require

    safetensors_torch = require("safetensors.torch", "wake from the disk tier")
    if not path.exists():
        raise FileNotFoundError(f"cache file {path} was deleted")
    loaded: dict[str, torch.Tensor] = safetensors_torch.load_file(str(path), device="cpu")
    for key in [k for k in loaded if k.startswith(PAD_PREFIX)]:
        del loaded[key]
    return loaded
