"""vramkit: keep accelerator memory honest.

Memory lives somewhere (devices: ``cuda``, ``mps``, ``xpu``, ``cpu``) and
something holds it (adapters: torch modules, FunASR models, ONNX Runtime
sessions). vramkit reads the first truthfully, in three layers (allocator,
cache, driver), and manages the second so that memory really comes back.

>>> import vramkit
>>> print(vramkit.snapshot())  # doctest: +SKIP
cpu     10.2 / 23.5 GiB used (43%) · process 412.3 MiB
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# Cheap, torch-free names load eagerly; the rest on first use (PEP 562), so
# `import vramkit` - and every pytest run, through the plugin's entry point -
# does not pay for importing torch until something needs it.
from vramkit._units import format_bytes, parse_bytes
from vramkit._version import __version__
from vramkit.errors import (
    BudgetExceededError,
    DeviceUnavailableError,
    InvalidArgumentError,
    MissingDependencyError,
    MissingModelError,
    ModelBusyError,
    ModelStateError,
    OffloadError,
    OutOfMemoryError,
    UnknownModelError,
    VramkitError,
    VramLeakError,
    VramLeakWarning,
    WorkerCrashedError,
    WorkerTimeoutError,
)

if TYPE_CHECKING:
    from vramkit import events
    from vramkit._status import status
    from vramkit.cleaning import CleanupReport, cleanup, freeze_heap
    from vramkit.controls import Controls, watch
    from vramkit.devices import Device, DeviceMemory, resolve_device
    from vramkit.memory import DeviceMemoryDelta, MemoryDelta, MemorySnapshot, snapshot
    from vramkit.model import LoadReport, ManagedModel, ModelState, ModelStats, UnloadReport
    from vramkit.oom import adaptive_batch_size, is_oom_error, oom_retry
    from vramkit.policy import CleanupPolicy, CleanupTracker, managed
    from vramkit.pool import ModelPool, PoolStatus
    from vramkit.referrers import ReferrerChain, find_referrers
    from vramkit.session import GpuSession, SessionReport, gpu_session
    from vramkit.tensors import TensorCensus, TensorInfo, live_tensors

_LAZY = {
    "events": "vramkit.events",
    **dict.fromkeys(("CleanupReport", "cleanup", "freeze_heap"), "vramkit.cleaning"),
    "status": "vramkit._status",
    **dict.fromkeys(("Controls", "watch"), "vramkit.controls"),
    **dict.fromkeys(("Device", "DeviceMemory", "resolve_device"), "vramkit.devices"),
    **dict.fromkeys(
        ("DeviceMemoryDelta", "MemoryDelta", "MemorySnapshot", "snapshot"), "vramkit.memory"
    ),
    **dict.fromkeys(
        ("LoadReport", "ManagedModel", "ModelState", "ModelStats", "UnloadReport"),
        "vramkit.model",
    ),
    **dict.fromkeys(("adaptive_batch_size", "is_oom_error", "oom_retry"), "vramkit.oom"),
    **dict.fromkeys(("CleanupPolicy", "CleanupTracker", "managed"), "vramkit.policy"),
    **dict.fromkeys(("ModelPool", "PoolStatus"), "vramkit.pool"),
    **dict.fromkeys(("ReferrerChain", "find_referrers"), "vramkit.referrers"),
    **dict.fromkeys(("GpuSession", "SessionReport", "gpu_session"), "vramkit.session"),
    **dict.fromkeys(("TensorCensus", "TensorInfo", "live_tensors"), "vramkit.tensors"),
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'vramkit' has no attribute {name!r}")
    imported = importlib.import_module(module)
    value = imported if module == f"vramkit.{name}" else getattr(imported, name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__all__ = [
    "BudgetExceededError",
    "CleanupPolicy",
    "CleanupReport",
    "CleanupTracker",
    "Controls",
    "Device",
    "DeviceMemory",
    "DeviceMemoryDelta",
    "DeviceUnavailableError",
    "GpuSession",
    "InvalidArgumentError",
    "LoadReport",
    "ManagedModel",
    "MemoryDelta",
    "MemorySnapshot",
    "MissingDependencyError",
    "MissingModelError",
    "ModelBusyError",
    "ModelPool",
    "ModelState",
    "ModelStateError",
    "ModelStats",
    "OffloadError",
    "OutOfMemoryError",
    "PoolStatus",
    "ReferrerChain",
    "SessionReport",
    "TensorCensus",
    "TensorInfo",
    "UnknownModelError",
    "UnloadReport",
    "VramLeakError",
    "VramLeakWarning",
    "VramkitError",
    "WorkerCrashedError",
    "WorkerTimeoutError",
    "__version__",
    "adaptive_batch_size",
    "cleanup",
    "events",
    "find_referrers",
    "format_bytes",
    "freeze_heap",
    "gpu_session",
    "is_oom_error",
    "live_tensors",
    "managed",
    "oom_retry",
    "parse_bytes",
    "resolve_device",
    "snapshot",
    "status",
    "watch",
]
