"""Torch helpers shared by the adapters that hold torch objects (torch, FunASR, objects).

Three ideas keep an unload honest:

- **Death is judged by storage.** A model's memory is its tensors' storages.
  A view, ``.data``, a ``.detach()`` copy or a ``state_dict()`` entry is a new
  tensor object on the same storage, so weak references to the parameters say
  nothing about the memory. :class:`StorageRefs` holds weak references to the
  storages themselves (``torch.multiprocessing.reductions.StorageWeakRef``,
  which follows the C++ ``StorageImpl``) and their bytes.
- **Freed anyway, whatever the storage.** :func:`free_storages` swaps the
  storage out from under every tensor in the heap that uses one of them
  (``tensor.set_()``), then resizes what torch owns to 0 bytes (which reaches
  holders only C++ sees). A storage torch cannot resize (a memory-mapped
  safetensors file, ``from_numpy``, DLPack) dies once no tensor uses it, so the
  tensors an autograd graph saved are emptied too; what still lives after that
  is reported with its bytes and the reason.
- **Loud everywhere.** Each surviving tensor becomes a *tombstone*: its class
  is swapped for a subclass whose ``__torch_function__`` raises
  :class:`~vramkit.errors.ModelStateError` with a message naming the model and
  what to do. A bound ``forward``, a kept submodule or a tensor taken from the
  model then fails at its first use, not with a cryptic shape error or by
  computing on nothing. :func:`restore` undoes it, keeping the object's
  identity, so a reference kept across an offload works again after a wake.
  vramkit's own code reads tombstones inside
  ``torch._C.DisableTorchFunctionSubclass()``.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from vramkit._gc import tensors_in_heap
from vramkit.errors import ModelStateError

__all__ = [
    "FreedStorages",
    "StorageRefs",
    "bury",
    "disable_module",
    "empty_tensor",
    "free_storages",
    "is_tombstone",
    "module_tensors",
    "modules_in",
    "neutralise_torch",
    "owns_tensors",
    "refuse_calls",
    "restore",
    "set_data",
    "storage_bytes",
    "storage_key",
    "tensors_in",
]

_raw = torch._C.DisableTorchFunctionSubclass
"""Read or change tensors (tombstones included) without running any ``__torch_function__``."""


def module_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and buffers of ``module`` and its submodules, each object once."""
    seen: set[int] = set()
    for tensor in (*module.parameters(), *module.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor
    # Plain tensor attributes (not registered as buffers) hold memory too:
    # FunASR's WavFrontend keeps its CMVN statistics that way.
    for sub in module.modules():
        for value in vars(sub).values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                yield value


def tensors_in(value: object, *, depth: int = 2) -> Iterator[torch.Tensor]:
    """Tensors reachable from ``value`` through modules, attributes, dicts and lists."""
    seen: set[int] = set()
    yield from _walk(value, depth, seen)


def _walk(value: object, depth: int, seen: set[int]) -> Iterator[torch.Tensor]:
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, torch.nn.Module):
        for tensor in module_tensors(value):
            if id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor
    elif depth > 0:
        children: Iterable[object]
        if isinstance(value, dict):
            children = value.values()
        elif isinstance(value, list | tuple):
            children = value
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            children = vars(value).values()
        else:
            return
        for child in list(children):
            yield from _walk(child, depth - 1, seen)


def modules_in(value: object, *, depth: int = 2) -> Iterator[torch.nn.Module]:
    """Modules reachable from ``value`` through attributes, dicts and lists (not inside modules)."""
    seen: set[int] = set()
    stack: list[tuple[object, int]] = [(value, depth)]
    while stack:
        item, level = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.nn.Module):
            yield item
            continue
        if level <= 0 or isinstance(item, type | torch.Tensor):
            continue
        if isinstance(item, dict):
            stack.extend((child, level - 1) for child in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((child, level - 1) for child in item)
        elif hasattr(item, "__dict__"):
            stack.extend((child, level - 1) for child in vars(item).values())


def storage_key(tensor: torch.Tensor) -> int | None:
    """The identity of ``tensor``'s storage (its C++ ``StorageImpl``), or ``None`` without one.

    ``None`` for ``meta`` tensors (no memory) and tensor subclasses that have
    no real storage. Call with ``__torch_function__`` disabled for tombstones.
    """
    try:
        if tensor.is_meta:
            return None
        return int(tensor.untyped_storage()._cdata)
    except (RuntimeError, NotImplementedError, TypeError, AttributeError):
        return None


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights counted once)."""
    seen: set[int] = set()
    total = 0
    with _raw():
        for tensor in tensors:
            key = storage_key(tensor)
            if key is not None and key not in seen:
                seen.add(key)
                total += tensor.untyped_storage().nbytes()
    return total


@dataclass(slots=True)
class _Tracked:
    ref: StorageWeakRef
    nbytes: int
    device: str
    resizable: bool


class StorageRefs:
    """Weak references to the distinct storages behind some tensors, with their bytes.

    Taking them keeps nothing alive: after the tensors' owner is dropped,
    :meth:`alive` says which storages (and so which bytes) something still holds.

    Args:
        tensors: The tensors whose storages to follow (``meta`` ones are skipped).
    """

    __slots__ = ("_entries",)

    def __init__(self, tensors: Iterable[torch.Tensor]) -> None:
        self._entries: dict[int, _Tracked] = {}
        with _raw():
            for tensor in tensors:
                key = storage_key(tensor)
                if key is None or key in self._entries:
                    continue
                storage = tensor.untyped_storage()
                self._entries[key] = _Tracked(
                    StorageWeakRef(storage),  # type: ignore[no-untyped-call]
                    storage.nbytes(),
                    str(tensor.device),
                    bool(storage.resizable()),
                )

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def total_bytes(self) -> int:
        """Bytes of every storage followed, as they were when taken."""
        return sum(e.nbytes for e in self._entries.values())

    def alive(self) -> dict[int, int]:
        """``{storage key: bytes it holds now}`` of the storages still alive.

        A storage emptied with ``resize_(0)`` is alive with 0 bytes: its
        memory is back, though something (an autograd graph) still refers to it.
        """
        return {k: _current_bytes(e) for k, e in self._entries.items() if not _expired(e.ref)}

    def alive_bytes(self) -> int:
        """Bytes still held by the storages followed."""
        return sum(self.alive().values())

    def all_dead(self) -> bool:
        """Whether every storage followed is gone (the memory is back)."""
        return all(_expired(e.ref) for e in self._entries.values())

    def describe(self, key: int) -> tuple[int, str, bool]:
        """``(bytes, device, resizable)`` of one followed storage."""
        entry = self._entries[key]
        return entry.nbytes, entry.device, entry.resizable


def _expired(ref: StorageWeakRef) -> bool:
    return bool(ref.expired())  # type: ignore[no-untyped-call]


def _current_bytes(entry: _Tracked) -> int:
    """What a live storage holds now (its size when taken, if it cannot be read back)."""
    try:
        storage = torch.UntypedStorage._new_with_weak_ptr(entry.ref.cdata)
    except RuntimeError:  # storages of some accelerators cannot be rebuilt from the pointer
        return entry.nbytes
    return entry.nbytes if storage is None else int(storage.nbytes())


@dataclass(frozen=True, slots=True)
class FreedStorages:
    """What :func:`free_storages` did.

    Attributes:
        freed_bytes: Bytes whose storages died or were emptied.
        held_bytes: Bytes still held after everything vramkit can do.
        tensors: Python tensors emptied (and made tombstones, with a message).
        held: One line per storage still held: its bytes, device and why.
    """

    freed_bytes: int = 0
    held_bytes: int = 0
    tensors: int = 0
    held: tuple[str, ...] = ()


def free_storages(
    refs: StorageRefs,
    message: str | None = None,
    *,
    survivors: Iterable[torch.Tensor] | None = None,
) -> FreedStorages:
    """Free the memory of the storages in ``refs`` that are still alive, wherever held.

    Every Python tensor using one of them is emptied with ``set_()`` (its shape
    becomes ``[0]``, so a stale use cannot read freed memory) and, with a
    ``message``, made a tombstone. Storages torch owns are then resized to 0
    bytes, which reaches holders only C++ can see (the saved tensors of an
    autograd graph, whose version counter then makes ``backward()`` fail
    loudly). Storages torch cannot resize (memory-mapped files, ``from_numpy``)
    die when no tensor uses them any more, so the tensors saved by the heap's
    autograd graphs are emptied as well.

    Args:
        refs: The storages to free (those already dead are skipped).
        message: What a tombstone says when used (``None``: no tombstones).
        survivors: The heap's tensors on those storages, when the caller has
            already found them (saves a scan of the heap).

    Returns:
        What was freed and what is still held, with why.
    """
    alive = refs.alive()
    if not alive:
        return FreedStorages()
    handles: dict[int, torch.UntypedStorage] = {}
    emptied = 0
    heap: list[torch.Tensor] | None = None  # one walk of the heap, for both uses below
    with _raw():
        if survivors is None:
            heap = tensors_in_heap()
            survivors = heap
        tensors = [t for t in survivors if storage_key(t) in alive]
        pinned = {k for k in alive if not refs.describe(k)[2]}
        if pinned:
            # Read before anything is emptied: emptying bumps the version counter
            # the graph checks, after which it refuses to hand its tensors out.
            tensors += _saved_tensors_on(pinned, tensors_in_heap() if heap is None else heap)
        if heap is not None:
            heap.clear()  # it holds every tensor: the ones to empty are in `tensors`
        # Keys first: emptying a tensor changes its storage (and a view's).
        keyed = [(t, storage_key(t)) for t in tensors]
        for tensor, key in keyed:
            if key is None or key not in alive:
                continue
            if refs.describe(key)[2] and key not in handles:
                handles[key] = tensor.untyped_storage()
            if message is not None:
                bury(tensor, message)
            empty_tensor(tensor)
            emptied += 1
        keyed.clear()
        tensors.clear()
        _resize_to_zero(handles)
        handles.clear()
        still = {k: n for k, n in refs.alive().items() if n}
    held = tuple(_why_held(refs, key) for key in sorted(still))
    held_bytes = sum(still.values())
    return FreedStorages(sum(alive.values()) - held_bytes, held_bytes, emptied, held)


def _resize_to_zero(storages: Mapping[int, torch.UntypedStorage]) -> None:
    for storage in storages.values():
        with contextlib.suppress(RuntimeError):  # shared memory, allocators that cannot resize
            storage.resize_(0)


def _saved_tensors_on(keys: set[int], heap: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensors the heap's autograd graphs saved on ``keys``' storages.

    For inputs and weights, ``grad_fn._saved_x`` gives back the very tensor
    the graph holds (not a copy), so emptying it releases the storage from
    C++ as well. ``heap`` is the heap's tensors. Caller has disabled
    ``__torch_function__``.
    """
    stack = [t.grad_fn for t in heap if t.grad_fn is not None]
    seen: set[int] = set()
    found: list[torch.Tensor] = []
    while stack and len(seen) < 100_000:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        found.extend(t for t in _saved_tensors(node) if storage_key(t) in keys)
        stack.extend(child for child, _ in node.next_functions if child is not None)
    return found


def _saved_tensors(node: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    if type(node).__name__ == "AccumulateGrad":
        return [node.variable]
    for name in dir(node):
        if not name.startswith("_saved_"):
            continue
        try:
            value = getattr(node, name)
        except RuntimeError:  # already freed by a backward pass
            continue
        values = value if isinstance(value, tuple | list) else (value,)
        found.extend(v for v in values if isinstance(v, torch.Tensor))
    return found


def _why_held(refs: StorageRefs, key: int) -> str:
    nbytes, device, resizable = refs.describe(key)
    from vramkit._units import format_bytes

    reason = (
        "held from C++ (a native library or an autograd graph with saved-tensor hooks)"
        if resizable
        else "held from C++ and not resizable (memory-mapped file, numpy or DLPack memory)"
    )
    return f"{format_bytes(nbytes)} on {device}: {reason}"


def empty_tensor(tensor: torch.Tensor) -> None:
    """Swap ``tensor``'s storage for an empty one: its memory goes once nothing else uses it."""
    try:
        with torch.no_grad():
            tensor.set_()  # type: ignore[call-overload]  # no-arg form: empty storage
    except RuntimeError:  # an inference tensor may only change inside inference mode
        with torch.inference_mode():
            tensor.set_()  # type: ignore[call-overload]


def set_data(tensor: torch.Tensor, source: torch.Tensor) -> None:
    """Make ``tensor`` (the same object) use ``source``'s storage, shape and strides."""
    try:
        with torch.no_grad():
            tensor.set_(source)  # type: ignore[call-overload]
    except RuntimeError:  # an inference tensor may only change inside inference mode
        with torch.inference_mode():
            tensor.set_(source)  # type: ignore[call-overload]


# ------------------------------------------------------------------------ tombstones

_MESSAGE = "_vramkit_tombstone"
_tombstone_classes: dict[type, type] = {}
_originals: dict[type, type] = {}


def _refuse(
    cls: type,
    func: Any,
    kinds: Any,
    args: tuple[Any, ...] = (),
    kwargs: Mapping[str, Any] | None = None,
) -> Any:
    raise ModelStateError(_message_in((*args, *(kwargs or {}).values())))


def _message_in(values: Iterable[Any]) -> str:
    for value in values:
        items = value if isinstance(value, list | tuple) else (value,)
        for item in items:
            if type(item) in _originals:
                message = vars(item).get(_MESSAGE)
                if isinstance(message, str):
                    return message
    return "this tensor belongs to a model that vramkit unloaded or offloaded"


def _tombstone_repr(self: torch.Tensor, *args: Any, **kwargs: Any) -> str:
    original = _originals[type(self)].__name__
    return f"<{original} of a model vramkit unloaded or offloaded: {vars(self).get(_MESSAGE)}>"


def _tombstone_class(cls: type) -> type | None:
    """The tombstone subclass of ``cls``, made once (``None`` when ``cls`` cannot have one)."""
    found = _tombstone_classes.get(cls)
    if found is not None:
        return found
    if getattr(cls, "__torch_dispatch__", None) is not torch._C._disabled_torch_dispatch_impl:
        return None  # wrapper subclasses (fake, distributed tensors) keep their class

    def body(namespace: dict[str, Any]) -> None:
        namespace["__torch_function__"] = classmethod(_refuse)
        namespace["__repr__"] = _tombstone_repr
        namespace["__module__"] = __name__

    found = types.new_class(f"Unloaded{cls.__name__}", (cls,), {}, body)
    _tombstone_classes[cls] = found
    _originals[found] = cls
    return found


def bury(tensor: torch.Tensor, message: str) -> None:
    """Make ``tensor`` raise :class:`ModelStateError` with ``message`` at any use.

    The object keeps its identity (its class is swapped for a tombstone
    subclass); :func:`restore` brings the original class back. A tensor that
    is already a tombstone gets the new message.
    """
    kind = type(tensor)
    if kind not in _originals:
        tomb = _tombstone_class(kind)
        if tomb is None:
            return
        try:
            tensor.__class__ = tomb
        except TypeError:  # a layout Python refuses to swap: the tensor is emptied anyway
            return
    vars(tensor)[_MESSAGE] = message


def restore(tensor: torch.Tensor) -> None:
    """Give a tombstone its original class back (no-op for other tensors)."""
    original = _originals.get(type(tensor))
    if original is None:
        return
    tensor.__class__ = original
    vars(tensor).pop(_MESSAGE, None)


def is_tombstone(tensor: object) -> bool:
    """Whether ``tensor`` is a tombstone of an unloaded or offloaded model."""
    return type(tensor) in _originals


# ------------------------------------------------------------------------ survivors


def neutralise_torch(survivors: Iterable[object], message: str) -> int:
    """Free what surviving modules and tensors pin; make every use of them fail loudly.

    Every submodule of a surviving module refuses to be called (a forward
    pre-hook raising :class:`ModelStateError` with ``message``); every tensor
    on the storages of the survivors' tensors, wherever it is held, is emptied
    and made a tombstone (see :func:`free_storages`).

    Returns:
        Bytes released (each storage once).
    """
    modules = [s for s in survivors if isinstance(s, torch.nn.Module)]
    tensors = [s for s in survivors if isinstance(s, torch.Tensor)]
    for module in modules:
        tensors.extend(module_tensors(module))
        disable_module(module, message)
    return free_storages(StorageRefs(tensors), message).freed_bytes


def disable_module(module: torch.nn.Module, message: str) -> list[Any]:
    """Make calling ``module``, or any submodule holding tensors, raise :class:`ModelStateError`.

    Submodules without tensors of their own (``ReLU``, ``Dropout``) are left
    alone: libraries share them between models (FunASR's feed-forward layers
    take a ``ReLU()`` made once, as a default argument), and refusing them
    would break every other model in the process.

    Returns:
        The hook handles (``handle.remove()`` undoes it).
    """
    return refuse_calls([m for m in module.modules() if m is module or _owns_tensors(m)], message)


def refuse_calls(modules: Iterable[torch.nn.Module], message: str) -> list[Any]:
    """Make calling each of ``modules`` raise :class:`ModelStateError` with ``message``.

    Returns:
        The hook handles (``handle.remove()`` undoes it).
    """

    def refuse(_module: torch.nn.Module, _args: object) -> None:
        raise ModelStateError(message)

    return [module.register_forward_pre_hook(refuse) for module in modules]


def owns_tensors(module: torch.nn.Module) -> bool:
    """Whether ``module`` itself holds tensors (parameters, buffers, tensor attributes)."""
    return _owns_tensors(module)


def _owns_tensors(module: torch.nn.Module) -> bool:
    if any(p is not None for p in module._parameters.values()):
        return True
    if any(b is not None for b in module._buffers.values()):
        return True
    return any(isinstance(v, torch.Tensor) for v in vars(module).values())
