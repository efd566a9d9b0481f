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
from typing import TYPE_CHECKING, overload

import torch

from vramkit._gc import tensors_in_heap
from vramkit._units import format_bytes
from vramkit.devices import DeviceLike, resolve_device

if TYPE_CHECKING:
    from vramkit.referrers import ReferrerChain

__all__ = ["TensorCensus", "TensorInfo", "live_tensors"]

StorageKey = tuple[str, int]


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
        old = earlier.keys()
        return TensorCensus([t for t in self._items if t.storage_key not in old])

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
    found: dict[StorageKey, TensorInfo] = {}
    for obj in tensors_in_heap():
        info = _describe(obj)
        if info is None or (wanted is not None and info.device != wanted):
            continue
        found.setdefault(info.storage_key, info)
    return TensorCensus(list(found.values()))


def _describe(tensor: torch.Tensor) -> TensorInfo | None:
    try:
        if tensor.is_meta or tensor.is_sparse or getattr(tensor, "is_nested", False):
            return None
        storage = tensor.untyped_storage()
        nbytes = storage.nbytes()
        key = (str(tensor.device), storage.data_ptr())
        ref: weakref.ReferenceType[torch.Tensor] | None = weakref.ref(tensor)
    except (RuntimeError, NotImplementedError, TypeError):
        return None  # tensor subclasses without storage (FakeTensor, functorch wrappers)
    if nbytes == 0:
        return None
    return TensorInfo(
        shape=tuple(tensor.shape),
        dtype=str(tensor.dtype),
        device=key[0],
        nbytes=nbytes,
        requires_grad=tensor.requires_grad,
        is_parameter=isinstance(tensor, torch.nn.Parameter),
        storage_key=key,
        _ref=ref,
    )
