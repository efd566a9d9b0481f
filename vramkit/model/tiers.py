"""Offload tiers and fast wake: move a model's weights off the device and back.

Reloading is why people keep models resident and run out of memory: a reload
rebuilds the module (random initialisation) and copies bytes through
``torch.load``. Most of that work is unnecessary to get the same weights back.

- ``cpu`` tier: weights move to host RAM (pinned when the model lives on CUDA
  and host RAM allows, so the way back is a fast DMA).
- ``disk`` tier: weights are written once to a safetensors file in a private
  cache directory; waking maps the file back (file-backed pages: no swap, and
  the kernel may drop them), then moves them to the device. A wake trusts only
  the file it wrote, unchanged, with every tensor's dtype and shape as it was
  at the offload (see :mod:`vramkit.model._tierfile`). A model woken from disk
  keeps its file: offloading it again writes nothing when its weights are
  provably unchanged (every tensor's SHA-256 equals the file's).
- Objects without torch modules (ONNX Runtime sessions, generic handles) and
  models whose weights accelerate's hooks hold cannot be offloaded live: their
  tier is "drop and rebuild" through the loader, and the report says so.

The model's tensor objects stay the same through a round trip: offloading
empties each one (its storage swapped out from under it) and makes it a
tombstone that raises :class:`~vramkit.errors.ModelStateError` at any use,
so a bound ``forward``, a kept submodule or a kept weight fails loudly while
the model is away; waking gives each its original class and its data back.
Dtypes, ``requires_grad``, buffers (persistent or not), plain tensor
attributes and tied weights (one Parameter under several names) come back as
they were, and a reference kept across the offload works again.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch

from vramkit._units import format_bytes
from vramkit.adapters import Adapter
from vramkit.adapters._torch_util import bury, empty_tensor, restore, set_data, storage_bytes
from vramkit.devices import Device, DeviceMemory, resolve_device
from vramkit.errors import InvalidArgumentError, OffloadError
from vramkit.model._tierfile import (
    TierFile,
    default_offload_dir,
    forget,
    read_file,
    tensor_digests,
    write_file,
)
from vramkit.model.reports import ModelStats

__all__ = [
    "HOST_HEADROOM",
    "OffloadReport",
    "Owner",
    "Tier",
    "TierCost",
    "WakeReport",
    "check_tier",
    "choose_tier",
    "default_offload_dir",
    "discard",
    "modules_of",
    "offload_object",
    "release_host_copies",
    "tier_costs",
    "wake_object",
]

Tier = Literal["cpu", "disk"]

Method = Literal["move", "file", "rebuild", "delegated"]
HOST_HEADROOM = 512 * 1024**2
"""Host RAM left free when a cpu-tier copy is made (or chosen), in bytes."""


@dataclass(frozen=True, slots=True)
class OffloadReport:
    """What an offload did.

    Attributes:
        model: The model's name.
        tier: ``"cpu"`` or ``"disk"``.
        method: ``"move"`` (weights moved to host RAM), ``"file"`` (weights in a
            safetensors file, module a ``meta`` skeleton), ``"rebuild"`` (the
            object was dropped and will be rebuilt by the loader: ONNX Runtime
            sessions and other objects without torch modules), or
            ``"delegated"`` (the object offloaded itself through its adapter:
            an isolated model, inside its worker process; ``note`` says how).
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
    method: Method
    seconds: float
    weight_bytes: int
    pinned: bool = False
    path: str | None = None
    reused_file: bool = False
    memory_before: DeviceMemory | None = None
    memory_after: DeviceMemory | None = None
    note: str = ""

    def __str__(self) -> str:
        where = {
            "move": "to host RAM",
            "file": f"to {self.path}",
            "rebuild": "by dropping it",
            "delegated": f"to {self.tier}",
        }
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
        method: How: ``"move"``, ``"file"``, ``"rebuild"`` (the loader ran) or
            ``"delegated"`` (the object woke itself, in its worker process).
        seconds: Wall time to ready.
        weight_bytes: Bytes brought back.
        fallback: Why the loader ran instead of the tier (a missing or
            truncated cache file), or ``None``.
    """

    model: str
    tier: Tier
    method: Method
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
class _Offloaded:
    """What an OFFLOADED model keeps besides its object.

    ``tensors`` are the model's own tensor objects (tombstones while
    offloaded), by key; ``host`` the cpu tier's copies of their data.
    """

    tier: Tier
    method: Method
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # cpu tier: key -> host copy
    devices: dict[str, torch.device] = field(default_factory=dict)  # key -> where it lived
    file: TierFile | None = None
    # disk tier: each tensor's dtype and shape at the offload (the emptied tensors keep
    # no shape), which the file must match at the wake
    layout: dict[str, tuple[torch.dtype, tuple[int, ...]]] = field(default_factory=dict)
    weight_bytes: int = 0
    pinned: bool = False
    resume: Callable[[], object] | None = None  # a delegated tier: how the object wakes itself


@dataclass(frozen=True, slots=True)
class _Stamp:
    """A quick sign that a woken tensor changed since it came from the file.

    A mismatch proves a change; a match proves nothing (a write through
    ``.data`` or a numpy view moves neither the version nor the sampled
    values), so an unchanged stamp is confirmed by the tensors' digests.
    """

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
    # tolist(), not numpy(): torch does not require numpy (at most 512 ints here).
    return bytes(values.view(torch.uint8).tolist()) if values.is_contiguous() else b""


@dataclass(slots=True)
class _DiskCache:
    """A file a woken model came from, valid while its tensors are unchanged."""

    file: TierFile
    stamps: dict[str, _Stamp]


# ---------------------------------------------------------------------- collecting tensors


def _distinct_tensors(modules: Mapping[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    """The distinct tensors of ``modules`` by key (the first name of each; ties share one).

    Parameters, buffers and plain tensor attributes (FunASR's CMVN) are all
    covered. Keys are the file's keys: a plain attribute's is marked ``@``.
    """
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    seen_modules: set[int] = set()
    for prefix, root in modules.items():
        for path, module in root.named_modules(prefix=prefix, remove_duplicate=False):
            if id(module) in seen_modules:
                continue
            seen_modules.add(id(module))
            entries = [(n, p) for n, p in module._parameters.items() if p is not None]
            entries += [(n, b) for n, b in module._buffers.items() if b is not None]
            entries += [
                (f"@{n}", v) for n, v in vars(module).items() if isinstance(v, torch.Tensor)
            ]
            for name, tensor in entries:
                if id(tensor) not in seen:
                    seen.add(id(tensor))
                    tensors[f"{path}.{name}" if path else name] = tensor
    return tensors


def _put_away(tensors: Mapping[str, torch.Tensor], message: str, *, empty: bool) -> None:
    """Make each tensor a tombstone saying ``message``; ``empty`` frees its memory too."""
    with torch._C.DisableTorchFunctionSubclass():
        for tensor in tensors.values():
            bury(tensor, message)
            if empty:
                empty_tensor(tensor)


def _bring_back(tensors: Mapping[str, torch.Tensor], data: Mapping[str, torch.Tensor]) -> None:
    """Give each tensor its class back and ``data[key]`` as its contents (the same object)."""
    with torch._C.DisableTorchFunctionSubclass():
        for key, tensor in tensors.items():
            restore(tensor)
            source = data[key]
            if source is not tensor:
                set_data(tensor, source)


def _nbytes(tensors: Iterable[torch.Tensor]) -> int:
    return storage_bytes(tensors)


# ---------------------------------------------------------------------- the tiers


@dataclass(frozen=True, slots=True)
class Owner:
    """What the tiers know of the model whose weights they move: data, not the model itself.

    Attributes:
        name: The model's name, for reports, errors and the file name.
        device: Where the weights live when the model is ready.
        adapter: The model's adapter (its ``modules()`` are what can be offloaded).
        size_bytes: The model's measured size, for a tier that drops the object.
    """

    name: str
    device: Device
    adapter: Adapter | None
    size_bytes: int | None


def modules_of(adapter: Adapter | None, obj: object) -> dict[str, torch.nn.Module]:
    """The torch modules ``adapter`` can offload from ``obj`` (empty: drop and rebuild)."""
    if adapter is None:
        return {}
    modules = getattr(adapter, "modules", None)
    return dict(modules(obj)) if modules is not None else {}


def offload_object(
    owner: Owner,
    obj: object,
    tier: Tier,
    directory: Path,
    *,
    message: str,
    rewrite: bool = False,
    previous: _Offloaded | None = None,
    file: _DiskCache | None = None,
) -> tuple[_Offloaded, OffloadReport, _DiskCache | None]:
    """Move ``obj``'s weights to ``tier``. On failure the object is left exactly as it was.

    ``previous`` is the cpu tier's state when a model offloaded to host RAM
    moves on to disk: its weights are written from host RAM, and the devices
    they wake to are still the ones they originally left. ``file`` is the file
    the model last woke from, reused when its weights are unchanged.
    ``message`` is what the model's tensors say if used while offloaded.

    Returns:
        The offloaded state, the report, and the file still worth reusing
        (``file``, or ``None`` once a new one was written).
    """
    started = time.perf_counter()
    before = owner.device.read()
    in_place = getattr(owner.adapter, "offload_in_place", None)
    if in_place is not None:
        # The object manages its own tiers (an isolated model: its worker
        # offloads, keeping its process and CUDA context, so waking stays fast).
        weight_bytes, note = in_place(obj, tier)
        resume = functools.partial(owner.adapter.wake_in_place, obj)  # type: ignore[union-attr]
        state = _Offloaded(tier, "delegated", weight_bytes=weight_bytes, resume=resume)
        seconds = time.perf_counter() - started
        report = OffloadReport(
            owner.name, tier, "delegated", seconds, weight_bytes, memory_before=before, note=note
        )
        return state, report, file
    modules = modules_of(owner.adapter, obj)
    if not modules and previous is None:
        state = _Offloaded(tier, "rebuild", weight_bytes=owner.size_bytes or 0)
        note = (
            f"{type(obj).__name__} cannot be offloaded live; it was dropped and the loader "
            "rebuilds it on wake"
        )
        return (
            state,
            OffloadReport(
                owner.name,
                tier,
                "rebuild",
                time.perf_counter() - started,
                state.weight_bytes,
                memory_before=before,
                note=note,
            ),
            file,
        )
    if previous is not None:  # cpu -> disk: the data is in the host copies
        tensors, data = previous.tensors, previous.host
    else:
        with torch._C.DisableTorchFunctionSubclass():
            tensors = _distinct_tensors(modules)
            meta = [k for k, t in tensors.items() if t.is_meta]
        if meta:
            raise OffloadError(f"{owner.name}: tensors on meta, cannot offload: {meta[:3]}")
        data = tensors
    weight_bytes = _nbytes(data.values())
    if tier == "cpu":
        state, note = _to_host(owner, tensors, weight_bytes, message)
    else:
        state, note, file = _to_disk(
            owner, tensors, data, weight_bytes, directory, message, rewrite=rewrite, file=file
        )
    state.weight_bytes = weight_bytes
    if previous is not None:
        state.devices = dict(previous.devices)
    report = OffloadReport(
        owner.name,
        tier,
        state.method,
        time.perf_counter() - started,
        weight_bytes,
        pinned=state.pinned,
        path=None if state.file is None else str(state.file.path),
        reused_file=note == "reused",
        memory_before=before,  # memory_after: read by the caller once it has cleaned up
        note="" if note == "reused" else note,
    )
    return state, report, file


def _to_host(
    owner: Owner, tensors: dict[str, torch.Tensor], weight_bytes: int, message: str
) -> tuple[_Offloaded, str]:
    devices = {k: t.device for k, t in tensors.items()}
    if all(d.type == "cpu" for d in devices.values()):
        # Nothing moves, but a use while offloaded still fails loudly.
        _put_away(tensors, message, empty=False)
        return (
            _Offloaded("cpu", "move", dict(tensors), dict(tensors), devices),
            "already in host RAM: the cpu tier frees nothing on this device",
        )
    pins = owner.device.pins_host_copies
    pin = pins and _host_has_room(weight_bytes)
    host: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        copy = tensor.detach().to("cpu")
        host[key] = copy.pin_memory() if pin else copy
    _put_away(tensors, message, empty=True)  # only once every copy exists
    note = "host RAM too tight to pin: pageable" if pins and not pin else ""
    return _Offloaded("cpu", "move", dict(tensors), host, devices, pinned=pin), note


def _host_has_room(nbytes: int) -> bool:
    free = Device("cpu").read().free_bytes
    return free is not None and free - nbytes > HOST_HEADROOM


def _to_disk(
    owner: Owner,
    tensors: dict[str, torch.Tensor],
    data: dict[str, torch.Tensor],
    weight_bytes: int,
    directory: Path,
    message: str,
    *,
    rewrite: bool,
    file: _DiskCache | None,
) -> tuple[_Offloaded, str, _DiskCache | None]:
    note = ""
    # The data may be tombstones whose bytes stayed (a cpu tier on a cpu device).
    with torch._C.DisableTorchFunctionSubclass():
        devices = {k: t.device for k, t in data.items()}
        layout = {k: (t.dtype, tuple(t.shape)) for k, t in data.items()}
        if not rewrite and file is not None and _unchanged(file, data):
            written, note = file.file, "reused"
        else:
            written = write_file(owner.name, data, weight_bytes, directory)
            if file is not None:
                forget(file.file)  # stale: the weights moved on since it was written
            file = None
    _put_away(tensors, message, empty=True)  # only once the file is written
    state = _Offloaded("disk", "file", dict(tensors), {}, devices, file=written, layout=layout)
    return state, note, file


def _unchanged(cache: _DiskCache, tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``tensors`` are provably the bytes of the file they woke from.

    The stamps rule out most changes for free; what they cannot see (a write
    through ``.data``, a numpy view) the digests catch, at the price of
    reading every weight once (see benchmarks/bench_offload.py). The file
    itself must also be the one written.
    """
    if set(cache.stamps) != set(tensors) or set(cache.file.entries) != set(tensors):
        return False
    if not all(cache.stamps[key].matches(tensor) for key, tensor in tensors.items()):
        return False
    if not cache.file.intact():
        return False
    recorded = cache.file.digests
    differs: list[str] = []

    def stop(key: str, digest: bytes) -> bool:
        if digest != recorded[key]:
            differs.append(key)
        return bool(differs)

    for _ in tensor_digests(tensors, stop):
        pass
    return not differs


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def wake_object(
    name: str, device: Device, state: _Offloaded
) -> tuple[WakeReport, _DiskCache | None]:
    """Bring the weights back into the model's object. On failure the state is unchanged.

    Returns:
        The report, and for the disk tier the file the model woke from (kept
        for a cheap re-offload while the weights stay unchanged); ``None``
        for the cpu tier.

    Raises:
        FileNotFoundError, OSError, RuntimeError: The cache file is missing or
            unreadable (the caller falls back to the loader), or the device ran
            out of memory (the model stays offloaded).
    """
    started = time.perf_counter()
    file = None
    if state.resume is not None:
        state.resume()
    else:
        with torch._C.DisableTorchFunctionSubclass():  # the tensors are tombstones until restored
            if state.method == "move":
                _from_host(state, device)
            else:
                file = _from_disk(state, device)
    report = WakeReport(
        name, state.tier, state.method, time.perf_counter() - started, state.weight_bytes
    )
    return report, file


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
            # Copies from pinned memory run asynchronously: wait for every
            # device they went to before the host copies may be freed.
            for destination in {t.device for t in moved.values()}:
                resolve_device(destination).synchronize()
    except BaseException:
        moved.clear()  # nothing was given back yet: the host copies are intact
        raise
    _bring_back(state.tensors, moved)


def _from_disk(state: _Offloaded, target: Device) -> _DiskCache:
    assert state.file is not None
    # What each tensor was at the offload: a file that disagrees is not ours.
    loaded = read_file(state.file, state.layout)
    on_host = all(d.type == "cpu" for d in state.devices.values())
    if not on_host:
        loaded = {k: t.to(_device_for(state, k, target)) for k, t in loaded.items()}
    _bring_back(state.tensors, loaded)
    return _DiskCache(state.file, {k: _Stamp.of(t) for k, t in state.tensors.items()})


def release_host_copies(state: _Offloaded) -> None:
    """Drop a cpu-tier state's host copies (pinned memory included) once they moved on."""
    state.host.clear()
    state.tensors.clear()
    state.resume = None  # it holds the object: an unload must see it die


def discard(state: _Offloaded | None, file: _DiskCache | None) -> None:
    """Free what an offloaded state holds (host copies, pinned memory); keep no file.

    A model woken from disk keeps its file for a cheap re-offload while it is
    ``READY`` (``state`` is then ``None``): ``file`` is that one, and it goes
    too. The caller forgets ``file`` afterwards.
    """
    if state is not None:
        release_host_copies(state)
        forget(state.file)
    if file is not None:
        forget(file.file)


def check_tier(tier: object) -> Tier:
    """Validate a tier name."""
    if tier == "cpu" or tier == "disk":
        return tier
    raise InvalidArgumentError(f"tier must be 'cpu' or 'disk'; got {tier!r}")


# ---------------------------------------------------------------------- choosing a tier


def tier_costs(stats: ModelStats, *, on_host: bool, file: _DiskCache | None) -> dict[str, TierCost]:
    """What each way of freeing the device would cost, from a model's measurements.

    Args:
        stats: The model's counters and measured costs.
        on_host: Whether the model lives in host RAM (a ``cpu`` device).
        file: The disk tier file the model woke from, if any: reused when unchanged.

    Returns:
        ``{"cpu": ..., "disk": ..., "unload": ...}``; wake times are measured
        where the model has woken from that tier before, else estimated from
        its size.
    """
    size = stats.size_bytes or 0
    measured = stats.wake_seconds
    written = stats.offload_seconds
    load = stats.load_seconds
    residue = stats.offload_residue_bytes  # what a tier leaves on the device (isolated models)
    # Estimates before a measurement: ~8 GB/s host<->device, ~1.5 GB/s reading
    # page cache or disk, ~0.5 GB/s writing a file and syncing it.
    cpu_estimate = 0.0 if on_host else size / 8e9
    disk_estimate = size / 1.5e9 + (0.0 if on_host else size / 8e9)
    reusable = file is not None and file.file.intact()
    disk_write = 0.0 if reusable else written.get("disk", size / 0.5e9)
    return {
        "cpu": TierCost(
            "cpu",
            0 if on_host else max(size - residue.get("cpu", 0), 0),
            size,
            0,
            measured.get("cpu", cpu_estimate),
            "cpu" in measured,
            written.get("cpu", cpu_estimate),
        ),
        "disk": TierCost(
            "disk",
            max(size - residue.get("disk", 0), 0),
            0,
            size,
            measured.get("disk", disk_estimate),
            "disk" in measured,
            disk_write,
        ),
        "unload": TierCost(
            "unload",
            size,
            0,
            0,
            load if load is not None else disk_estimate * 10,
            load is not None,
        ),
    }


def choose_tier(costs: Mapping[str, TierCost], size_bytes: int, host_free_bytes: int) -> str:
    """The cheapest way to free a model's device memory, given :func:`tier_costs`.

    ``cpu`` when host RAM holds the weights with :data:`HOST_HEADROOM` to spare
    and the tier frees anything; then ``disk`` when waking from it beats a
    reload; else ``unload``. A tier that frees less than half of what an
    unload frees (an isolated model's worker keeps its interpreter and CUDA
    context through an offload) is not worth its wake: ``unload``.
    """
    enough = costs["unload"].frees_device_bytes / 2
    cpu, disk = costs["cpu"], costs["disk"]
    if (
        cpu.frees_device_bytes
        and cpu.frees_device_bytes >= enough
        and size_bytes + HOST_HEADROOM <= host_free_bytes
    ):
        return "cpu"
    if disk.frees_device_bytes >= enough and disk.wake_seconds < costs["unload"].wake_seconds:
        return "disk"
    return "unload"
