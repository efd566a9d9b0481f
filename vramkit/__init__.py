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

from importlib.metadata import PackageNotFoundError, version

from vramkit._units import format_bytes, parse_bytes
from vramkit.cleanup import CleanupReport, cleanup
from vramkit.devices import Device, DeviceMemory, resolve_device
from vramkit.errors import (
    BudgetExceededError,
    DeviceUnavailableError,
    InvalidArgumentError,
    MissingDependencyError,
    ModelBusyError,
    ModelStateError,
    OffloadError,
    OutOfMemoryError,
    VramkitError,
    VramLeakError,
)
from vramkit.referrers import ReferrerChain, find_referrers
from vramkit.snapshot import DeviceMemoryDelta, MemoryDelta, MemorySnapshot, snapshot
from vramkit.tensors import TensorCensus, TensorInfo, live_tensors

try:
    __version__ = version("vramkit")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "BudgetExceededError",
    "CleanupReport",
    "Device",
    "DeviceMemory",
    "DeviceMemoryDelta",
    "DeviceUnavailableError",
    "InvalidArgumentError",
    "MemoryDelta",
    "MemorySnapshot",
    "MissingDependencyError",
    "ModelBusyError",
    "ModelStateError",
    "OffloadError",
    "OutOfMemoryError",
    "ReferrerChain",
    "TensorCensus",
    "TensorInfo",
    "VramLeakError",
    "VramkitError",
    "__version__",
    "cleanup",
    "find_referrers",
    "format_bytes",
    "live_tensors",
    "parse_bytes",
    "resolve_device",
    "snapshot",
]
