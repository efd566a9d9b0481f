"""A census of the tensors alive in this process: the raw material of leak reports.

>>> import torch, vramkit
>>> planted = torch.zeros(1024, 1024)
>>> census = vramkit.live_tensors("cpu")
>>> any(t.shape == (1024, 1024) for t in census)
True

The census walks the objects Python's garbage collector tracks, so it sees
every tensor a Python object can reach (globals, closures, lists, modules,
frames) and counts each storage once, however many views share it. It does not
see tensors only C++ holds (inside an autograd graph's saved variables, a
TorchScript module's internals): an output that keeps a graph alive shows up as
the output tensor, not as the activations it pins. It costs tens of
milliseconds on a large heap: it is for reports, not for hot paths.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, overload

import torch

from vramkit._gc import tensor_classes, tensors_in_heap
from vramkit._units import format_bytes
from vramkit.devices import DeviceLike, resolve_device

if TYPE_CHECKING:
    from vramkit.referrers import ReferrerChain

__all__ = ["StorageBaseline", "TensorCensus", "TensorInfo", "live_tensors"]

StorageKey = tuple[str, int]

# Weak references to storages as torch's StorageWeakRef takes them (an integer
# handle each), without a Python object per storage: a baseline holds thousands.
_STORAGE: Any = torch.UntypedStorage


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One live storage and the tensor found holding it.

    The census keeps only a weak reference to the tensor, so taking it never
    keeps memory alive.

    Attributes:
        shape: Shape of the tensor found (a view's shape, if a view was found first).
        dtype: Its dtype, as a string such as ``"torch.float32"``.
        device: Its device, such as ``"cuda:0"`` or ``"cpu"``.
        nbytes: Bytes of the underlying storage (counted once per storage).
        requires_grad: Whether the tensor takes part in autograd.
        is_parameter: Whether it is an ``nn.Parameter``.
        storage_key: ``(device, data_ptr)`` identifying the storage.
    """

    shape: tuple[int, ...]
    dtype: str
    device: str
    nbytes: int
    requires_grad: bool
    is_parameter: bool
    storage_key: StorageKey
    _ref: weakref.ReferenceType[torch.Tensor] | None = field(
        default=None, repr=False, compare=False
    )

    @property
    def tensor(self) -> torch.Tensor | None:
        """The tensor, if it is still alive."""
        return self._ref() if self._ref is not None else None

    def referrers(
        self, *, max_depth: int = 12, seconds: float | None = None
    ) -> list[ReferrerChain]:
        """Who holds this tensor, as readable chains from a root (module global, frame...).

        Args:
            max_depth: How many objects a chain may hold (each costs a heap scan).
            seconds: Optional wall-clock cap (see :func:`~vramkit.find_referrers`);
                by default the search is bounded by work only, so the answer
                does not depend on how busy the machine is.

        Returns:
            Chains such as ``__main__.cache[3] -> Linear.weight``; empty when the
            tensor died or nothing but vramkit's own objects reaches it.
        """
        tensor = self.tensor
        if tensor is None:
            return []
        from vramkit.referrers import find_referrers

        return find_referrers(tensor, max_depth=max_depth, seconds=seconds)

    def describe(self) -> str:
        """One line: ``Tensor[1024, 1024] float32 on cpu, 4.0 MiB``."""
        kind = "Parameter" if self.is_parameter else "Tensor"
        dims = ", ".join(str(d) for d in self.shape)
        dtype = self.dtype.removeprefix("torch.")
        grad = ", requires_grad" if self.requires_grad else ""
        return f"{kind}[{dims}] {dtype} on {self.device}, {format_bytes(self.nbytes)}{grad}"

    def __str__(self) -> str:
        return self.describe()


class TensorCensus(Sequence[TensorInfo]):
    """The live storages found, largest first, with totals per device."""

    __slots__ = ("_items",)

    def __init__(self, items: Sequence[TensorInfo]) -> None:
        self._items = tuple(sorted(items, key=lambda t: t.nbytes, reverse=True))

    @overload
    def __getitem__(self, index: int) -> TensorInfo: ...
    @overload
    def __getitem__(self, index: slice) -> TensorCensus: ...
    def __getitem__(self, index: int | slice) -> TensorInfo | TensorCensus:
        if isinstance(index, slice):
            return TensorCensus(self._items[index])
        return self._items[index]

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self._items)

    @property
    def total_bytes(self) -> int:
        """Bytes of all storages in the census."""
        return sum(t.nbytes for t in self._items)

    def by_device(self) -> dict[str, int]:
        """Bytes per device, such as ``{"cpu": 4194304}``."""
        totals: dict[str, int] = {}
        for t in self._items:
            totals[t.device] = totals.get(t.device, 0) + t.nbytes
        return totals

    def keys(self) -> frozenset[StorageKey]:
        """The storage keys present, for comparing two censuses."""
        return frozenset(t.storage_key for t in self._items)

    def new_since(self, earlier: TensorCensus) -> TensorCensus:
        """Storages present now that ``earlier`` did not have: what appeared in between."""
        return self.without(earlier.keys())

    def without(self, keys: frozenset[StorageKey]) -> TensorCensus:
        """This census less the storages whose keys are in ``keys``."""
        return TensorCensus([t for t in self._items if t.storage_key not in keys])

    def format(self, limit: int = 10) -> str:
        """A readable table of the largest ``limit`` storages."""
        if not self._items:
            return "no live tensors"
        lines = [t.describe() for t in self._items[:limit]]
        if len(self._items) > limit:
            rest = self._items[limit:]
            lines.append(f"... and {len(rest)} more, {format_bytes(sum(t.nbytes for t in rest))}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"TensorCensus({len(self)} storages, {format_bytes(self.total_bytes)})"


def live_tensors(device: DeviceLike | None = None) -> TensorCensus:
    """Find every tensor reachable from Python objects, one entry per storage.

    Args:
        device: Only tensors on this device (``"cpu"``, ``"cuda:0"``...); ``None``
            for all. ``meta`` tensors, which hold no memory, are never counted.

    Returns:
        A :class:`TensorCensus`, largest storage first.
    """
    wanted = str(resolve_device(device)) if device is not None else None
    return _census(tensors_in_heap(), wanted)


class StorageBaseline:
    """The storages on one device alive at a moment, held weakly: what a leak check compares to.

    Only the storages' addresses and weak references are read here, nothing
    per tensor that a census of what is new would not need. A storage freed
    later may leave its address to a new one, so an address seen before
    proves nothing alone: a storage counts as old only while the storage seen
    at that address is still alive.

    Args:
        device: The device watched.
        tensors: The tensors of one heap walk (:func:`vramkit._gc.tensors_in_heap`),
            to share that walk with other readers; walked here when omitted.
    """

    __slots__ = ("__weakref__", "_device", "_handles")

    def __init__(self, device: DeviceLike, tensors: list[torch.Tensor] | None = None) -> None:
        self._device = str(resolve_device(device))
        self._handles: dict[int, int] = {}
        weak_ref = _STORAGE._weak_ref
        handles = self._handles
        for tensor in _on_device(tensors_in_heap() if tensors is None else tensors, self._device):
            found = _storage(tensor)
            if found is not None and found[1] not in handles:
                handles[found[1]] = weak_ref(found[0])
        weakref.finalize(self, _free_handles, handles)

    def new_tensors(self, tensors: list[torch.Tensor] | None = None) -> TensorCensus:
        """The storages on the device now that were not alive at the baseline.

        Args:
            tensors: The tensors of one heap walk, to share it; walked here when omitted.
        """
        expired = _STORAGE._expired
        handles = self._handles
        fresh = []
        for tensor in _on_device(tensors_in_heap() if tensors is None else tensors, self._device):
            found = _storage(tensor)
            if found is None:
                continue
            handle = handles.get(found[1])
            if handle is None or expired(handle):
                fresh.append(tensor)
        return _census(fresh, None)


def storage_keys(tensors: list[torch.Tensor], device: str) -> frozenset[StorageKey]:
    """The keys of the storages ``tensors`` hold on ``device`` (a resolved name)."""
    keys = set()
    for tensor in _on_device(tensors, device):
        found = _storage(tensor)
        if found is not None:
            keys.add((device, found[1]))
    return frozenset(keys)


def _free_handles(handles: dict[int, int]) -> None:
    free = _STORAGE._free_weak_ref
    for handle in handles.values():
        free(handle)
    handles.clear()


def _on_device(tensors: list[torch.Tensor], device: str) -> list[torch.Tensor]:
    on_host = device == "cpu"  # the common case: a C attribute instead of a device object
    names: dict[torch.device, str] = {}
    found = []
    for tensor in tensors:
        try:
            if tensor.is_cpu if on_host else _device_name(tensor.device, names) == device:
                found.append(tensor)
        except (RuntimeError, NotImplementedError, TypeError):
            continue  # subclasses that refuse every use (vramkit's tombstones) hold nothing
    return found


def _device_name(device: torch.device, names: dict[torch.device, str]) -> str:
    """``str(device)``, once per device: it is a Python call per tensor otherwise."""
    name = names.get(device)
    if name is None:
        name = names[device] = str(device)
    return name


_PLAIN = frozenset({torch.Tensor, torch.nn.Parameter})


def _storage(tensor: torch.Tensor) -> tuple[torch.UntypedStorage, int] | None:
    """The tensor's storage and its address; ``None`` for tensors without real memory."""
    try:
        storage = tensor.untyped_storage()
        if type(tensor) not in _PLAIN and storage.device.type == "meta":
            return None  # a FakeTensor: shaped like memory, holds none, warns on data_ptr()
        return storage, storage.data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):
        # Subclasses without storage (functorch wrappers), or with a storage
        # whose address cannot be read (FakeTensor, left by torch.compile).
        return None


def _census(tensors: list[torch.Tensor], wanted: str | None) -> TensorCensus:
    """One entry per storage of ``tensors`` (on ``wanted`` only, unless ``None``)."""
    if wanted is not None:
        tensors = _on_device(tensors, wanted)
    parameters = tensor_classes(torch.nn.Parameter)
    names: dict[torch.device, str] = {}
    found: dict[StorageKey, TensorInfo] = {}
    for tensor in tensors:
        info = _describe(tensor, parameters, names)
        if info is not None:
            found.setdefault(info.storage_key, info)
    return TensorCensus(list(found.values()))


def _is_parameter(tensor: torch.Tensor, parameters: frozenset[type]) -> bool:
    """``isinstance(tensor, Parameter)`` without torch's metaclass, a Python call per tensor.

    ``parameters`` is ``Parameter`` and its subclasses. A Parameter made of a
    tensor subclass keeps the subclass and says so with ``_is_param``.
    """
    kind = type(tensor)
    if kind in parameters:
        return True
    return kind is not torch.Tensor and getattr(tensor, "_is_param", False) is True


def _describe(
    tensor: torch.Tensor, parameters: frozenset[type], names: dict[torch.device, str]
) -> TensorInfo | None:
    try:
        if tensor.is_meta or tensor.is_sparse or getattr(tensor, "is_nested", False):
            return None
        found = _storage(tensor)
        if found is None:
            return None
        nbytes = found[0].nbytes()
        name = _device_name(tensor.device, names)
        key = (name, found[1])
        ref: weakref.ReferenceType[torch.Tensor] | None = weakref.ref(tensor)
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # tensor subclasses that refuse every use
    if nbytes == 0:
        return None
    return TensorInfo(
        shape=tuple(tensor.shape),
        dtype=str(tensor.dtype),
        device=name,
        nbytes=nbytes,
        requires_grad=tensor.requires_grad,
        is_parameter=_is_parameter(tensor, parameters),
        storage_key=key,
        _ref=ref,
    )
