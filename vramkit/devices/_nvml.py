"""The only module that imports ``pynvml`` (package ``nvidia-ml-py``).

NVML starts lazily, once per process, on the first question that needs it. If
the package is missing or there is no driver, every answer is ``None`` and the
reason is logged once at DEBUG level: the absence of NVML is an answer, not a
crash. NVML reads the driver without creating a CUDA context, so vramkit can
report a GPU that torch has not touched yet.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from typing import Any, NamedTuple

__all__ = ["DriverMemory", "device_count", "gpu_processes", "memory", "process_used", "shutdown"]

_log = logging.getLogger("vramkit.nvml")
_lock = threading.Lock()
_nvml: Any = None  # the pynvml module once initialised
_failed: str | None = None
_init_pid = -1
_handles: dict[int, Any] = {}


class DriverMemory(NamedTuple):
    """What the driver says about one GPU, in bytes."""

    total_bytes: int
    free_bytes: int
    used_bytes: int


def _module() -> Any:
    """The initialised ``pynvml`` module, or ``None`` when NVML cannot start here."""
    global _nvml, _failed, _init_pid
    if _nvml is not None and _init_pid == os.getpid():
        return _nvml
    with _lock:
        if _init_pid != os.getpid():
            # A forked child must initialise NVML again; forget inherited handles.
            _nvml, _failed = None, None
            _handles.clear()
        if _nvml is not None or _failed is not None:
            return _nvml
        _init_pid = os.getpid()
        try:
            import pynvml
        except ImportError:
            _failed = 'pynvml is not installed (pip install "vramkit[nvml]")'
            _log.debug("NVML unavailable: %s", _failed)
            return None
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            _failed = f"nvmlInit failed: {exc}"
            _log.debug("NVML unavailable: %s", _failed)
            return None
        _nvml = pynvml
        atexit.register(shutdown)
        return _nvml


def unavailable_reason() -> str | None:
    """Why NVML is not answering, or ``None`` when it is (or has not been asked yet)."""
    _module()
    return _failed


def _handle(cuda_index: int) -> Any:
    """The NVML handle of torch's ``cuda:<cuda_index>``, honouring ``CUDA_VISIBLE_DEVICES``."""
    nvml = _module()
    if nvml is None:
        return None
    handle = _handles.get(cuda_index)
    if handle is not None:
        return handle
    try:
        handle = _lookup(nvml, cuda_index)
    except nvml.NVMLError as exc:
        _log.debug("no NVML handle for cuda:%d: %s", cuda_index, exc)
        return None
    if handle is not None:
        _handles[cuda_index] = handle
    return handle


def _lookup(nvml: Any, cuda_index: int) -> Any:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or not visible.strip():
        return nvml.nvmlDeviceGetHandleByIndex(cuda_index)
    entries = [entry.strip() for entry in visible.split(",") if entry.strip()]
    if cuda_index >= len(entries):
        return None
    entry = entries[cuda_index]
    if entry.isdigit():
        return nvml.nvmlDeviceGetHandleByIndex(int(entry))
    if entry.startswith(("GPU-", "MIG-")):
        return nvml.nvmlDeviceGetHandleByUUID(entry)
    # Abbreviated UUIDs and other forms: ask torch for the UUID (initialises CUDA's runtime).
    import torch

    uuid = str(torch.cuda.get_device_properties(cuda_index).uuid)
    return nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")


def memory(cuda_index: int) -> DriverMemory | None:
    """Total, free and used bytes of ``cuda:<cuda_index>`` as NVML reports them."""
    handle = _handle(cuda_index)
    if handle is None:
        return None
    nvml = _nvml
    try:
        info = nvml.nvmlDeviceGetMemoryInfo(handle)
    except nvml.NVMLError as exc:
        _log.debug("nvmlDeviceGetMemoryInfo(cuda:%d) failed: %s", cuda_index, exc)
        return None
    return DriverMemory(int(info.total), int(info.free), int(info.used))


def process_used(cuda_index: int, pid: int | None = None) -> int | None:
    """Bytes this process (or ``pid``) holds on ``cuda:<cuda_index>``, per NVML.

    Returns:
        Bytes, 0 when the process has no context on that GPU, or ``None`` where
        NVML cannot tell (no NVML, a container's PID namespace hiding PIDs,
        drivers that withhold per-process usage).
    """
    processes = _running(cuda_index)
    if processes is None:
        return None
    pid = os.getpid() if pid is None else pid
    matched = [p.usedGpuMemory for p in processes if p.pid == pid]
    if not matched:
        # Either we hold nothing there, or PIDs are namespaced (containers) and
        # we cannot recognise ourselves: only the first is safe to call 0.
        return 0 if not processes or _pids_visible(processes) else None
    if any(used is None for used in matched):
        return None
    return int(max(matched))


def _running(cuda_index: int) -> list[Any] | None:
    """NVML's compute and graphics process entries on ``cuda:<cuda_index>``, or ``None``."""
    handle = _handle(cuda_index)
    if handle is None:
        return None
    nvml = _nvml
    try:
        processes = list(nvml.nvmlDeviceGetComputeRunningProcesses(handle))
        processes += list(nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
    except nvml.NVMLError as exc:
        _log.debug("NVML process list for cuda:%d failed: %s", cuda_index, exc)
        return None
    return processes


def gpu_processes(cuda_index: int) -> dict[int, int | None] | None:
    """Every process on ``cuda:<cuda_index>`` with the bytes it holds, per NVML.

    Returns:
        ``{pid: bytes}`` (bytes ``None`` where the driver withholds them; a
        process listed as both compute and graphics counts its larger entry),
        or ``None`` where NVML cannot tell.
    """
    processes = _running(cuda_index)
    if processes is None:
        return None
    found: dict[int, int | None] = {}
    for entry in processes:
        used = None if entry.usedGpuMemory is None else int(entry.usedGpuMemory)
        known = found.get(entry.pid)
        found[entry.pid] = used if known is None or (used is not None and used > known) else known
    return found


def device_count() -> int | None:
    """How many GPUs torch would number (``CUDA_VISIBLE_DEVICES`` honoured), per NVML."""
    nvml = _module()
    if nvml is None:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        return len([entry for entry in visible.split(",") if entry.strip()])
    try:
        return int(nvml.nvmlDeviceGetCount())
    except nvml.NVMLError as exc:
        _log.debug("nvmlDeviceGetCount failed: %s", exc)
        return None


def _pids_visible(processes: list[Any]) -> bool:
    """Whether the PIDs NVML lists exist in our PID namespace."""
    return all(os.path.exists(f"/proc/{p.pid}") for p in processes)


def shutdown() -> None:
    """Shut NVML down (registered at exit; safe to call twice)."""
    global _nvml
    with _lock:
        nvml, _nvml = _nvml, None
        _handles.clear()
    if nvml is not None and _init_pid == os.getpid():
        try:
            nvml.nvmlShutdown()
        except Exception:
            _log.debug("nvmlShutdown failed", exc_info=True)
