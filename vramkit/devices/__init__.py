"""Where memory lives: one backend per kind of device, found through a registry.

>>> from vramkit.devices import resolve_device, get_backend
>>> device = resolve_device("cpu")
>>> reading = get_backend(device.kind).read(0)
>>> reading.total_bytes > 0
True

Device strings are torch's (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``, a
``torch.device`` or an ``int`` meaning a CUDA ordinal). A new kind (a scripted
:class:`vramkit.testing.FakeDevice`, or another accelerator) joins with
:func:`register_backend`; nothing in vramkit branches on kinds by name.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Union

from vramkit.devices._base import Device, DeviceBackend, DeviceMemory
from vramkit.devices.cpu import CpuBackend
from vramkit.devices.cuda import CudaBackend
from vramkit.devices.cuda import is_initialized as cuda_initialized
from vramkit.devices.mps import MpsBackend
from vramkit.devices.xpu import XpuBackend
from vramkit.errors import DeviceUnavailableError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = [
    "Device",
    "DeviceBackend",
    "DeviceLike",
    "DeviceMemory",
    "available_devices",
    "default_device",
    "get_backend",
    "process_used_bytes",
    "register_backend",
    "resolve_device",
    "unregister_backend",
]

DeviceLike = Union[str, "torch.device", int, Device]
"""Anything that names a device: ``"cuda:0"``, ``torch.device("mps")``, ``0``, a :class:`Device`."""

_lock = threading.Lock()
_backends: dict[str, DeviceBackend] = {}
_available: tuple[Device, ...] | None = None  # cached: devices do not come and go
# Exactly torch's spelling: lower case, no spaces, ASCII digits, no leading zeros.
_SPEC = re.compile(r"^([a-z_][a-z0-9_]*)(?::(-?(?:0|[1-9][0-9]*)))?$", re.ASCII)


def register_backend(backend: DeviceBackend, *, replace: bool = False) -> None:
    """Make a kind of device known to vramkit.

    Args:
        backend: An object answering :class:`DeviceBackend`.
        replace: Allow replacing a backend already registered for that kind.

    Raises:
        InvalidArgumentError: When ``backend`` does not answer the protocol, or
            its kind is taken and ``replace`` is false.
    """
    global _available
    if not isinstance(backend, DeviceBackend):
        raise InvalidArgumentError(
            f"backend must implement vramkit.devices.DeviceBackend "
            f"(kind, indexed, is_available, device_count, read, empty_cache, synchronize, "
            f"reset_peak); got {backend!r}"
        )
    with _lock:
        if backend.kind in _backends and not replace:
            raise InvalidArgumentError(
                f"a backend for {backend.kind!r} is already registered; pass replace=True"
            )
        _backends[backend.kind] = backend
        _available = None


def unregister_backend(kind: str) -> None:
    """Forget the backend of ``kind`` (a no-op when none is registered)."""
    global _available
    with _lock:
        _backends.pop(kind, None)
        _available = None


def get_backend(kind: str) -> DeviceBackend:
    """The backend registered for ``kind``.

    Raises:
        InvalidArgumentError: When no backend knows that kind.
    """
    try:
        return _backends[kind]
    except KeyError:
        raise InvalidArgumentError(
            f"unknown device kind {kind!r}; known kinds: {', '.join(sorted(_backends))}"
        ) from None


def process_used_bytes(device: Device, pid: int) -> int | None:
    """Bytes another process (a worker) holds on ``device``, as the driver or the OS sees it.

    Backends answer through an optional ``read_process(index, pid)``: NVML's
    per-process usage on CUDA (the context included), the resident set size on
    ``cpu``. A backend without it answers ``None``.

    Returns:
        Bytes; 0 once the process is gone; ``None`` where this cannot be read.
    """
    read = getattr(get_backend(device.kind), "read_process", None)
    if read is None:
        return None
    value = read(device.index or 0, pid)
    return None if value is None else int(value)


def available_devices() -> tuple[Device, ...]:
    """Every device usable in this process: ``cpu`` first, then accelerators by kind and index.

    The answer is computed once (devices do not appear at run time) and again
    after :func:`register_backend` or :func:`unregister_backend`.
    """
    global _available
    devices = _available
    if devices is not None:
        return devices
    found: list[Device] = []
    for backend in list(_backends.values()):
        if not backend.is_available():
            continue
        if backend.indexed:
            found.extend(Device(backend.kind, i) for i in range(backend.device_count()))
        else:
            found.append(Device(backend.kind))
    found.sort(key=lambda d: (d.kind != "cpu", d.kind, d.index or 0))
    devices = tuple(found)
    with _lock:
        _available = devices
    return devices


def default_device() -> Device:
    """The device a model goes to when none is named: the first accelerator, else ``cpu``."""
    import torch

    accelerators = [d for d in available_devices() if d.kind in {"cuda", "xpu", "mps"}]
    if not accelerators:
        return Device("cpu")
    first = accelerators[0]
    if first.kind == "cuda" and cuda_initialized():
        return Device("cuda", torch.cuda.current_device())
    return first


def resolve_device(spec: DeviceLike | None = None) -> Device:
    """Parse and check a device name the way torch writes them.

    Args:
        spec: ``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``, a ``torch.device``,
            an ``int`` (a CUDA ordinal, as in torch), a :class:`Device`, or
            ``None`` for :func:`default_device`.

    Returns:
        The device, with its index filled in for indexed kinds (``"cuda"`` is
        the current CUDA device, ``cuda:0`` unless torch has chosen another).

    Raises:
        InvalidArgumentError: A malformed name, an unknown kind, a negative
            index, or a value of the wrong type.
        DeviceUnavailableError: A well-formed device that this machine lacks
            (``"cuda"`` without a GPU, ``"cuda:7"`` on a one-GPU box).
    """
    if spec is None:
        return default_device()
    if isinstance(spec, Device):
        kind, index = spec.kind, spec.index
    elif isinstance(spec, bool) or (not isinstance(spec, str | int) and not _is_torch_device(spec)):
        raise InvalidArgumentError(
            "device must be a string like 'cuda', 'cuda:1', 'mps' or 'cpu', a torch.device, "
            f"or a CUDA ordinal; got {spec!r} ({type(spec).__name__})"
        )
    elif isinstance(spec, int):
        kind, index = "cuda", spec
    else:
        kind, index = _parse_name(str(spec))
    return _check(kind, index, spec)


def _parse_name(text: str) -> tuple[str, int | None]:
    """Split a device name the way torch does, refusing what torch refuses."""
    match = _SPEC.fullmatch(text)
    if match is None:
        hint = ""
        if text != text.strip():
            hint = f" (no spaces: {text.strip()!r})"
        elif text != text.lower() and _SPEC.fullmatch(text.lower()):
            hint = f" (device names are lower case: {text.lower()!r})"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*:-?0[0-9]+", text, re.ASCII):
            kind, _, number = text.partition(":")
            hint = f" (no leading zeros: '{kind}:{int(number)}')"
        raise InvalidArgumentError(
            f"device {text!r} is not a device name; expected 'kind' or 'kind:index' "
            f"such as 'cuda', 'cuda:1', 'mps' or 'cpu'{hint}"
        )
    index = match.group(2)
    return match.group(1), None if index is None else int(index)


def _is_torch_device(value: object) -> bool:
    return type(value).__name__ == "device" and type(value).__module__ == "torch"


def _check(kind: str, index: int | None, spec: object) -> Device:
    if kind not in _backends:
        raise InvalidArgumentError(
            f"unknown device {spec!r}; known kinds: {', '.join(sorted(_backends))}"
        )
    if index is not None and index < 0:
        raise InvalidArgumentError(f"device index must be >= 0; got {spec!r}")
    backend = _backends[kind]
    if not backend.is_available():
        raise DeviceUnavailableError(f"device {spec!r} is not available: {_why_unavailable(kind)}")
    if not backend.indexed:
        if index not in (None, 0):
            raise DeviceUnavailableError(f"device {spec!r} does not exist: there is one {kind}")
        return Device(kind)
    count = backend.device_count()
    if index is None:
        index = _current_index(kind)
    if index >= count:
        names = ", ".join(f"{kind}:{i}" for i in range(count))
        plural = "device" if count == 1 else "devices"
        raise DeviceUnavailableError(
            f"device {spec!r} does not exist: this machine has {count} {kind.upper()} "
            f"{plural} ({names})"
        )
    return Device(kind, index)


def _current_index(kind: str) -> int:
    """The current device of an indexed kind, without initialising anything new."""
    import torch

    if kind == "cuda" and cuda_initialized():
        return int(torch.cuda.current_device())
    return 0


def _why_unavailable(kind: str) -> str:
    import torch

    if kind == "cuda":
        if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
            return f"this torch ({torch.__version__}) was built without CUDA"
        return "torch sees no CUDA GPU (driver missing, or CUDA_VISIBLE_DEVICES hides them all)"
    if kind == "mps":
        return "MPS needs Apple silicon and a torch build with MPS support"
    if kind == "xpu":
        return f"this torch ({torch.__version__}) has no XPU support or sees no XPU device"
    return f"the {kind!r} backend reports no device"


for _backend in (CpuBackend(), CudaBackend(), MpsBackend(), XpuBackend()):
    register_backend(_backend)
del _backend
