"""Where memory lives: one backend per kind of device, found through a registry.

>>> from vramkit.devices import resolve_device
>>> device = resolve_device("cpu")
>>> device.read().total_bytes > 0
True

Device strings are torch's (``"cuda"``, ``"cuda:1"``, ``"mps"``, ``"cpu"``, a
``torch.device`` or an ``int`` meaning a CUDA ordinal). They are parsed and
checked once: the :class:`Device` that comes back reads and cleans itself, and
passing it to any vramkit call checks nothing again. A new kind (a scripted
:class:`vramkit.testing.FakeDevice`, or another accelerator) joins with
:func:`register_backend`; what a kind does differently is a method of its
backend (:class:`BackendBase`), so nothing in vramkit branches on kinds by name.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Union

from vramkit.devices._base import (
    BackendBase,
    Device,
    DeviceBackend,
    DeviceMemory,
    MemoryFields,
    _backends,
    completed,
    get_backend,
)
from vramkit.devices.cpu import CpuBackend
from vramkit.devices.cuda import CudaBackend
from vramkit.devices.mps import MpsBackend
from vramkit.devices.xpu import XpuBackend
from vramkit.errors import DeviceUnavailableError, InvalidArgumentError

if TYPE_CHECKING:
    import torch

__all__ = [
    "BackendBase",
    "Device",
    "DeviceBackend",
    "DeviceLike",
    "DeviceMemory",
    "MemoryFields",
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
_available: tuple[Device, ...] | None = None  # cached: devices do not come and go
_parsed: frozenset[Device] = frozenset()  # the same devices, to pass a parsed one through
_named: dict[str | int, Device] = {}  # names already resolved: a snapshot("cpu") checks nothing
# Exactly torch's spelling: lower case, no spaces, ASCII digits, no leading zeros.
_SPEC = re.compile(r"^([a-z_][a-z0-9_]*)(?::(-?(?:0|[1-9][0-9]*)))?$", re.ASCII)


def register_backend(backend: DeviceBackend, *, replace: bool = False) -> None:
    """Make a kind of device known to vramkit.

    Args:
        backend: An object answering :class:`DeviceBackend`. One that does not
            derive from :class:`BackendBase` is wrapped, so that the optional
            hooks answer with their defaults (:func:`get_backend` then returns
            the wrapper, which passes other attributes through).
        replace: Allow replacing a backend already registered for that kind.

    Raises:
        InvalidArgumentError: When ``backend`` does not answer the protocol, or
            its kind is taken and ``replace`` is false.
    """
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
        _backends[backend.kind] = completed(backend)
        _forget_devices()


def unregister_backend(kind: str) -> None:
    """Forget the backend of ``kind`` (a no-op when none is registered)."""
    with _lock:
        _backends.pop(kind, None)
        _forget_devices()


def _forget_devices() -> None:
    """Drop the cached device list (caller holds the lock): a kind came or went."""
    global _available, _parsed
    _available, _parsed = None, frozenset()
    _named.clear()


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
    global _available, _parsed
    devices = _available
    if devices is not None:
        return devices
    found: list[Device] = []
    hosts: set[str] = set()
    for backend in list(_backends.values()):
        if not backend.is_available():
            continue
        if backend.host:
            hosts.add(backend.kind)
        if backend.indexed:
            found.extend(Device(backend.kind, i) for i in range(backend.device_count()))
        else:
            found.append(Device(backend.kind))
    found.sort(key=lambda d: (d.kind not in hosts, d.kind, d.index or 0))
    devices = tuple(found)
    with _lock:
        _available, _parsed = devices, frozenset(devices)
    return devices


def default_device() -> Device:
    """The device a model goes to when none is named: the first accelerator, else the host."""
    devices = available_devices()
    for device in devices:
        backend = device.backend
        if backend.preferred:
            return Device(device.kind, backend.current_index()) if backend.indexed else device
    return next((d for d in devices if d.is_host), Device("cpu"))


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
    if type(spec) is str or type(spec) is int:
        known = _named.get(spec)
        if known is not None:
            return known
        device = _resolve(spec)
        # "cuda" means torch's current device, which set_device changes: only
        # an explicit index, or a kind with one device, names the same one always.
        if device.index is None or isinstance(spec, int) or ":" in spec:
            with _lock:
                _named[spec] = device
        return device
    return _resolve(spec)


def _resolve(spec: DeviceLike) -> Device:
    if isinstance(spec, Device):
        available_devices()  # fills _parsed when a kind came or went
        if spec in _parsed:
            return spec  # parsed before (devices do not come and go): nothing to check again
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
        raise DeviceUnavailableError(
            f"device {spec!r} is not available: {backend.why_unavailable()}"
        )
    if not backend.indexed:
        if index not in (None, 0):
            raise DeviceUnavailableError(f"device {spec!r} does not exist: there is one {kind}")
        return Device(kind)
    count = backend.device_count()
    if index is None:
        index = backend.current_index()
    if index >= count:
        names = ", ".join(f"{kind}:{i}" for i in range(count))
        plural = "device" if count == 1 else "devices"
        raise DeviceUnavailableError(
            f"device {spec!r} does not exist: this machine has {count} {kind.upper()} "
            f"{plural} ({names})"
        )
    return Device(kind, index)


for _backend in (CpuBackend(), CudaBackend(), MpsBackend(), XpuBackend()):
    register_backend(_backend)
del _backend
