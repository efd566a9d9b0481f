"""Offload tiers and fast wake: move a model's weights off the device and back.

Reloading is why people keep models resident and run out of memory: a reload
rebuilds the module (random initialisation) and copies bytes through
``torch.load``. Most of that work is unnecessary to get the same weights back.

- ``cpu`` tier: weights move to host RAM (pinned when the model lives on CUDA
  and host RAM allows, so the way back is a fast DMA); the module objects stay.
- ``disk`` tier: weights are written once to a safetensors file in a cache
  directory and the module becomes a ``meta`` skeleton; waking maps the file
  back (file-backed pages: no swap, and the kernel may drop them) and assigns
  the tensors into the skeleton, then moves them to the device. A model woken
  from disk keeps its file: offloading it again unchanged writes nothing.
- Objects without torch modules (ONNX Runtime sessions, generic handles) cannot
  be offloaded live: their tier is "drop and rebuild" through the loader, and
  the report says so.

Every round trip restores the same tensors: dtypes, ``requires_grad``,
buffers (persistent or not), plain tensor attributes, and tied weights (one
Parameter under several names wakes as one Parameter).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from vramkit._units import format_bytes
from vramkit._utils import user_cache_dir
from vramkit.devices import Device, DeviceMemory, get_backend
from vramkit.errors import InvalidArgumentError, OffloadError

if TYPE_CHECKING:
    from vramkit.model import ManagedModel

__all__ = [
    "OffloadReport",
    "Tier",
    "TierCost",
    "WakeReport",
    "default_offload_dir",
]

Tier = Literal["cpu", "disk"]

_HOST_HEADROOM = 512 * 1024**2  # leave this much host RAM free for a cpu-tier copy


@dataclass(frozen=True, slots=True)
class OffloadReport:
    """What an offload did.

    Attributes:
        model: The model's name.
        tier: ``"cpu"`` or ``"disk"``.
        method: ``"move"`` (weights moved to host RAM), ``"file"`` (weights in a
            safetensors file, module a ``meta`` skeleton), or ``"rebuild"`` (the
            object was dropped and will be rebuilt by the loader: ONNX Runtime
            sessions and other objects without torch modules).
        seconds: Wall time.
        weight_bytes: Bytes of the weights that moved (tied weights once).
        pinned: Whether the host copy is pinned (``cpu`` tier from CUDA).
        path: The cache file (``disk`` tier).
        reused_file: Whether an existing file with unchanged weights was kept
            instead of writing again.
        memory_before: The device's reading before.
        memory_after: The reading after.
        note: Anything a person should know (``"already in host RAM: ..."``).
    """

    model: str
    tier: Tier
    method: Literal["move", "file", "rebuild"]
    seconds: float
    weight_bytes: int
    pinned: bool = False
    path: str | None = None
    reused_file: bool = False
    memory_before: DeviceMemory | None = None
    memory_after: DeviceMemory | None = None
    note: str = ""

    def __str__(self) -> str:
        where = {"move": "to host RAM", "file": f"to {self.path}", "rebuild": "by dropping it"}
        text = (
            f"offloaded {self.model} ({format_bytes(self.weight_bytes)}) {where[self.method]} "
            f"in {self.seconds:.3f} s"
        )
        if self.reused_file:
            text += " (file unchanged, not rewritten)"
        return text + (f"; {self.note}" if self.note else "")


@dataclass(frozen=True, slots=True)
class WakeReport:
    """What a wake did.

    Attributes:
        model: The model's name.
        tier: The tier it woke from.
        method: How: ``"move"``, ``"file"`` or ``"rebuild"`` (the loader ran).
        seconds: Wall time to ready.
        weight_bytes: Bytes brought back.
        fallback: Why the loader ran instead of the tier (a missing or
            truncated cache file), or ``None``.
    """

    model: str
    tier: Tier
    method: Literal["move", "file", "rebuild"]
    seconds: float
    weight_bytes: int
    fallback: str | None = None

    def __str__(self) -> str:
        text = f"woke {self.model} from {self.tier} ({self.method}) in {self.seconds:.3f} s"
        return text + (f"; fell back to the loader: {self.fallback}" if self.fallback else "")


@dataclass(frozen=True, slots=True)
class TierCost:
    """What offloading to one tier would free and cost, from measurements where available.

    Attributes:
        tier: ``"cpu"``, ``"disk"`` or ``"unload"``.
        frees_device_bytes: Device bytes it frees.
        host_bytes: Host RAM it keeps occupied.
        disk_bytes: Disk space it takes.
        wake_seconds: Seconds back to ready (the last measured wake, else an
            estimate from the size; for ``unload``, the last load time).
        measured: Whether ``wake_seconds`` was measured on this model.
        offload_seconds: Seconds the offload itself would take (for ``disk``,
            writing the file unless an unchanged one exists; measured where
            this model has done it, else estimated).
    """

    tier: str
    frees_device_bytes: int
    host_bytes: int
    disk_bytes: int
    wake_seconds: float
    measured: bool
    offload_seconds: float = 0.0

    @property
    def round_trip_seconds(self) -> float:
        """Offload plus wake: what choosing this tier costs before the model is back."""
        return self.offload_seconds + self.wake_seconds


@dataclass(slots=True)
class _Slot:
    """One place a tensor lives: ``module._parameters[name]``, a buffer, or a plain attribute."""

    module: torch.nn.Module
    kind: Literal["param", "buffer", "attr"]
    name: str
    key: str  # the tensor's key in the file (tied slots share one)
    requires_grad: bool
    param_type: type


@dataclass(slots=True)
class _Offloaded:
    """What an OFFLOADED model keeps besides its object."""

    tier: Tier
    method: Literal["move", "file", "rebuild"]
    slots: list[_Slot] = field(default_factory=list)
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # cpu tier: key -> host tensor
    devices: dict[str, torch.device] = field(default_factory=dict)  # key -> where it lived
    path: Path | None = None
    weight_bytes: int = 0
    pinned: bool = False


@dataclass(frozen=True, slots=True)
class _Stamp:
    """How to tell a woken tensor is unchanged since it came from the file."""

    ref: weakref.ref[torch.Tensor]
    version: int  # bumped by every in-place op through the tensor itself
    data_ptr: int  # changed by `param.data = other`
    sample: bytes  # a strided sample of the values: catches most writes through `.data`

    @classmethod
    def of(cls, tensor: torch.Tensor) -> _Stamp:
        return cls(weakref.ref(tensor), _version(tensor), tensor.data_ptr(), _sample(tensor))

    def matches(self, tensor: torch.Tensor) -> bool:
        return (
            self.ref() is tensor
            and self.version == _version(tensor)
            and self.data_ptr == tensor.data_ptr()
            and self.sample == _sample(tensor)
        )


def _sample(tensor: torch.Tensor, points: int = 64) -> bytes:
    """The bytes of up to ``points`` evenly spaced elements (a few µs; one small copy on GPU)."""
    flat = tensor.detach().reshape(-1)
    count = flat.numel()
    if count == 0:
        return b""
    steps = min(count, points)
    # Integer arithmetic: float32 linspace rounds count - 1 up to count for
    # tensors over 2**24 elements (any LLM's embedding) and indexes past the end.
    index = torch.arange(steps, dtype=torch.int64, device=flat.device) * (count - 1)
    index = index // max(steps - 1, 1)
    values = flat.index_select(0, index).cpu()
    return bytes(values.view(torch.uint8).numpy()) if values.is_contiguous() else b""


@dataclass(slots=True)
class _DiskCache:
    """A file a woken model came from, valid while its tensors are unchanged."""

    path: Path
    stamps: dict[str, _Stamp]


# ---------------------------------------------------------------------- cache directory

_files_lock = threading.Lock()
_files: set[Path] = set()


def default_offload_dir() -> Path:
    """Where disk-tier files go: ``$VRAMKIT_CACHE_DIR``, else the user cache dir + ``vramkit``."""
    override = os.environ.get("VRAMKIT_CACHE_DIR")
    return Path(override).expanduser() if override else user_cache_dir() / "offload"


def _remember(path: Path) -> None:
    with _files_lock:
        _files.add(path)


def _forget(path: Path | None) -> None:
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
        if match is None or int(match.group(1)) == os.getpid() or _alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


@atexit.register
def _remove_leftover_files() -> None:
    with _files_lock:
        leftovers = list(_files)
        _files.clear()
    for path in leftovers:
        with contextlib.suppress(OSError):
            path.unlink()


# ---------------------------------------------------------------------- collecting tensors


def _slots(modules: Mapping[str, torch.nn.Module]) -> tuple[list[_Slot], dict[str, torch.Tensor]]:
    """Every tensor slot of ``modules`` and the distinct tensors by key (ties share a key)."""
    slots: list[_Slot] = []
    tensors: dict[str, torch.Tensor] = {}
    key_of: dict[int, str] = {}
    seen_modules: set[int] = set()
    for prefix, root in modules.items():
        for path, module in root.named_modules(prefix=prefix, remove_duplicate=False):
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            entries: list[tuple[Literal["param", "buffer", "attr"], str, torch.Tensor]] = []
            entries += [("param", n, p) for n, p in module._parameters.items() if p is not None]
            entries += [("buffer", n, b) for n, b in module._buffers.items() if b is not None]
            entries += [
                ("attr", n, v) for n, v in vars(module).items() if isinstance(v, torch.Tensor)
            ]
            for kind, name, tensor in entries:
                key = key_of.get(id(tensor))
                if key is None:
                    key = f"{path}.{name}" if path else name
                    if kind == "attr":
                        key = f"{path}.@{name}" if path else f"@{name}"
                    key_of[id(tensor)] = key
                    tensors[key] = tensor
                slots.append(_Slot(module, kind, name, key, tensor.requires_grad, type(tensor)))
    return slots, tensors


def _assign(slots: Iterable[_Slot], values: Mapping[str, torch.Tensor]) -> None:
    """Put ``values[slot.key]`` in every slot; tied slots get the very same Parameter."""
    params: dict[str, torch.Tensor] = {}
    for slot in slots:
        value = values[slot.key]
        if slot.kind == "param":
            param = params.get(slot.key)
            if param is None:
                param = _as_parameter(value, slot)
                params[slot.key] = param
            slot.module._parameters[slot.name] = param  # type: ignore[assignment]
        elif slot.kind == "buffer":
            slot.module._buffers[slot.name] = value
        else:
            object.__setattr__(slot.module, slot.name, value)


def _as_parameter(value: torch.Tensor, slot: _Slot) -> torch.Tensor:
    param_type = slot.param_type if issubclass(slot.param_type, torch.nn.Parameter) else None
    cls = param_type or torch.nn.Parameter
    try:
        return cls(value, requires_grad=slot.requires_grad)
    except TypeError:  # a Parameter subclass with its own constructor
        return torch.nn.Parameter(value, requires_grad=slot.requires_grad)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    from vramkit.adapters._torch_util import storage_bytes

    return storage_bytes(tensors)


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80] or "model"


# ---------------------------------------------------------------------- the tiers


def modules_of(model: ManagedModel[Any], obj: object) -> dict[str, torch.nn.Module]:
    """The torch modules the model's adapter can offload (empty: drop and rebuild)."""
    adapter = model.adapter
    if adapter is None:
        return {}
    modules = getattr(adapter, "modules", None)
    return dict(modules(obj)) if modules is not None else {}


def offload_object(
    model: ManagedModel[Any],
    obj: object,
    tier: Tier,
    directory: Path,
    *,
    rewrite: bool = False,
    previous: _Offloaded | None = None,
) -> tuple[_Offloaded, OffloadReport]:
    """Move ``obj``'s weights to ``tier``. On failure the object is left exactly as it was.

    ``previous`` is the cpu tier's state when a model offloaded to host RAM
    moves on to disk: its weights are written from host RAM, and the devices
    they wake to are still the ones they originally left.
    """
    started = time.perf_counter()
    backend = get_backend(model.device.kind)
    index = model.device.index or 0
    before = backend.read(index)
    modules = modules_of(model, obj)
    if not modules:
        state = _Offloaded(tier, "rebuild", weight_bytes=model.size_bytes or 0)
        note = (
            f"{type(obj).__name__} cannot be offloaded live; it was dropped and the loader "
            "rebuilds it on wake"
        )
        return state, OffloadReport(
            model.name,
            tier,
            "rebuild",
            time.perf_counter() - started,
            state.weight_bytes,
            memory_before=before,
            note=note,
        )
    slots, tensors = _slots(modules)
    meta = [k for k, t in tensors.items() if t.is_meta]
    if meta:
        raise OffloadError(f"{model.name}: tensors already on meta, cannot offload: {meta[:3]}")
    weight_bytes = _nbytes(tensors.values())
    if tier == "cpu":
        state, note = _to_host(model, slots, tensors, weight_bytes)
    else:
        state, note = _to_disk(model, slots, tensors, weight_bytes, directory, rewrite=rewrite)
    state.weight_bytes = weight_bytes
    if previous is not None:
        state.devices = dict(previous.devices)
    report = OffloadReport(
        model.name,
        tier,
        state.method,
        time.perf_counter() - started,
        weight_bytes,
        pinned=state.pinned,
        path=None if state.path is None else str(state.path),
        reused_file=note == "reused",
        memory_before=before,  # memory_after: read by the caller once it has cleaned up
        note="" if note == "reused" else note,
    )
    return state, report


def _to_host(
    model: ManagedModel[Any],
    slots: list[_Slot],
    tensors: dict[str, torch.Tensor],
    weight_bytes: int,
) -> tuple[_Offloaded, str]:
    devices = {k: t.device for k, t in tensors.items()}
    on_host = all(d.type == "cpu" for d in devices.values())
    if on_host:
        return (
            _Offloaded("cpu", "move", slots, dict(tensors), devices),
            "already in host RAM: the cpu tier frees nothing on this device",
        )
    pin = model.device.kind == "cuda" and _host_has_room(weight_bytes)
    host: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        copy = tensor.detach().to("cpu")
        host[key] = copy.pin_memory() if pin else copy
    _assign(slots, host)
    note = "" if pin or model.device.kind != "cuda" else "host RAM too tight to pin: pageable"
    return _Offloaded("cpu", "move", slots, host, devices, pinned=pin), note


def _host_has_room(nbytes: int) -> bool:
    free = get_backend("cpu").read(0).free_bytes
    return free is not None and free - nbytes > _HOST_HEADROOM


def _to_disk(
    model: ManagedModel[Any],
    slots: list[_Slot],
    tensors: dict[str, torch.Tensor],
    weight_bytes: int,
    directory: Path,
    *,
    rewrite: bool,
) -> tuple[_Offloaded, str]:
    devices = {k: t.device for k, t in tensors.items()}
    cache: _DiskCache | None = model._disk_cache
    note = ""
    if not rewrite and cache is not None and _unchanged(cache, tensors) and cache.path.exists():
        path, note = cache.path, "reused"
    else:
        path = _write(model, tensors, weight_bytes, directory)
        model._disk_cache = None
    skeleton = {k: torch.empty_like(t, device="meta") for k, t in tensors.items()}
    _assign(slots, skeleton)
    return _Offloaded("disk", "file", slots, {}, devices, path=path), note


def _unchanged(cache: _DiskCache, tensors: Mapping[str, torch.Tensor]) -> bool:
    if set(cache.stamps) != set(tensors):
        return False
    return all(cache.stamps[key].matches(tensor) for key, tensor in tensors.items())


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def _write(
    model: ManagedModel[Any], tensors: dict[str, torch.Tensor], weight_bytes: int, directory: Path
) -> Path:
    final = directory / f"{_safe_name(model.name)}-{os.getpid()}-{id(model):x}.safetensors"
    partial = final.with_suffix(".partial")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        _sweep_once(directory)
        if (free := _disk_free(directory)) is not None and free < weight_bytes:
            raise OSError(
                28, f"{format_bytes(free)} free in {directory}, {format_bytes(weight_bytes)} needed"
            )
        write_aligned_safetensors(partial, tensors, metadata={"vramkit_model": model.name})
        if partial.stat().st_size < weight_bytes:
            raise OSError(5, f"short write: {partial.stat().st_size} bytes of {weight_bytes}")
        os.replace(partial, final)
    except Exception as exc:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise OffloadError(
            f"{model.name}: could not write the disk tier to {directory} ({exc}); "
            "the model is still loaded and nothing was lost"
        ) from exc
    _remember(final)
    return final


ALIGNMENT = 64
"""Byte alignment of every tensor in the disk tier's file (and so in its mapping)."""

_PAD_PREFIX = "__vramkit_pad_"
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
            layout[f"{_PAD_PREFIX}{index}"] = {
                "dtype": "U8",
                "shape": [pad],
                "data_offsets": [offset, offset + pad],
            }
            order.append((f"{_PAD_PREFIX}{index}", pad))
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
            fh.write(host.reshape(-1).view(torch.uint8).numpy().data)
            del host
        fh.flush()
        os.fsync(fh.fileno())


def _disk_free(directory: Path) -> int | None:
    try:
        stats = os.statvfs(directory)
    except (OSError, AttributeError):
        return None
    return stats.f_bavail * stats.f_frsize


def wake_object(model: ManagedModel[Any], state: _Offloaded) -> WakeReport:
    """Bring the weights back into the model's object. On failure the state is unchanged.

    Raises:
        FileNotFoundError, OSError, RuntimeError: The cache file is missing or
            unreadable (the caller falls back to the loader), or the device ran
            out of memory (the model stays offloaded).
    """
    started = time.perf_counter()
    target = model.device
    if state.method == "move":
        _from_host(state, target)
    else:
        _from_disk(model, state, target)
    return WakeReport(
        model.name, state.tier, state.method, time.perf_counter() - started, state.weight_bytes
    )


def _device_for(state: _Offloaded, key: str, target: Device) -> torch.device:
    original = state.devices.get(key)
    return original if original is not None else target.torch


def _from_host(state: _Offloaded, target: Device) -> None:
    moved: dict[str, torch.Tensor] = {}
    try:
        for key, tensor in state.host.items():
            destination = _device_for(state, key, target)
            moved[key] = (
                tensor
                if tensor.device == destination
                else tensor.to(destination, non_blocking=state.pinned)
            )
        if state.pinned:
            torch.cuda.synchronize()
    except BaseException:
        moved.clear()  # nothing was assigned yet: the host copies are intact
        raise
    _assign(state.slots, moved)


def _from_disk(model: ManagedModel[Any], state: _Offloaded, target: Device) -> None:
    from vramkit._optional import require

    assert state.path is not None
    safetensors_torch = require("safetensors.torch", "wake from the disk tier")
    if not state.path.exists():
        raise FileNotFoundError(f"cache file {state.path} was deleted")
    on_host = all(d.type == "cpu" for d in state.devices.values())
    loaded = safetensors_torch.load_file(str(state.path), device="cpu")
    for key in [k for k in loaded if k.startswith(_PAD_PREFIX)]:
        del loaded[key]
    missing = {s.key for s in state.slots} - set(loaded)
    if missing:
        raise OSError(f"cache file {state.path} lacks {sorted(missing)[:3]}")
    if not on_host:
        loaded = {k: t.to(_device_for(state, k, target)) for k, t in loaded.items()}
    _assign(state.slots, loaded)
    model._disk_cache = _DiskCache(
        state.path, {k: _Stamp.of(t) for k, t in _current(state.slots).items()}
    )


def _current(slots: Iterable[_Slot]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    for slot in slots:
        if slot.key in found:
            continue
        value: torch.Tensor | None
        if slot.kind == "param":
            value = slot.module._parameters[slot.name]
        elif slot.kind == "buffer":
            value = slot.module._buffers[slot.name]
        else:
            value = getattr(slot.module, slot.name)
        if value is not None:
            found[slot.key] = value
    return found


def release_host_copies(state: _Offloaded) -> None:
    """Drop a cpu-tier state's host copies (pinned memory included) once they moved on."""
    state.host.clear()
    state.slots.clear()


def discard(model: ManagedModel[Any], state: _Offloaded | None) -> None:
    """Free what an offloaded state holds (host copies, pinned memory); keep no file.

    A model woken from disk keeps its file for a cheap re-offload while it is
    ``READY`` (``state`` is then ``None``): that file goes too.
    """
    if state is not None:
        release_host_copies(state)
        if state.path is not None:
            _forget(state.path)
    cache = model._disk_cache
    if cache is not None:
        _forget(cache.path)
        model._disk_cache = None


def check_tier(tier: object) -> Tier:
    """Validate a tier name."""
    if tier == "cpu" or tier == "disk":
        return tier
    raise InvalidArgumentError(f"tier must be 'cpu' or 'disk'; got {tier!r}")
