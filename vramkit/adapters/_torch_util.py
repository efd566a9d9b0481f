"""Torch helpers shared by the adapters that hold torch objects (torch, FunASR, objects)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from vramkit._gc import tensors_in_heap
from vramkit.errors import ModelStateError

__all__ = [
    "disable_module",
    "free_storages",
    "module_tensors",
    "modules_in",
    "neutralise_torch",
    "storage_bytes",
    "tensors_in",
]


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


def storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights counted once)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in tensors:
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        key = (str(tensor.device), storage.data_ptr())
        if key not in seen:
            seen.add(key)
            total += storage.nbytes()
    return total


def free_storages(survivors: Iterable[torch.Tensor]) -> int:
    """Free the memory behind tensors that outlived their model, wherever they are held.

    Every Python-visible tensor sharing one of those storages (views included)
    is first emptied with ``set_()`` so its shape stays consistent (size 0) and
    a stale use cannot read freed memory; then the storage itself is resized
    to 0, which releases the bytes even for holders only C++ can see (an
    autograd graph's saved tensors, whose version counter now makes
    ``backward()`` fail loudly).

    Returns:
        Bytes released.
    """
    storages: dict[tuple[str, int], Any] = {}
    for tensor in survivors:
        if tensor.is_meta:
            continue
        storage = tensor.untyped_storage()
        if storage.nbytes():
            storages[(str(tensor.device), storage.data_ptr())] = storage
    if not storages:
        return 0
    for tensor in tensors_in_heap():
        try:
            key = (str(tensor.device), tensor.untyped_storage().data_ptr())
        except (RuntimeError, NotImplementedError):
            continue
        if key in storages:
            _empty(tensor)
    freed = 0
    for storage in storages.values():
        size = storage.nbytes()
        try:
            storage.resize_(0)
        except RuntimeError:
            # Memory torch does not own (from_numpy, DLPack, mmap'd files) cannot be
            # resized; the tensors viewing it are empty now, the owner frees it.
            continue
        freed += size
    return freed


def _empty(tensor: torch.Tensor) -> None:
    try:
        with torch.no_grad():
            tensor.set_()  # type: ignore[call-overload]  # no-arg form: empty storage
    except RuntimeError:  # an inference tensor may only change inside inference mode
        with torch.inference_mode():
            tensor.set_()  # type: ignore[call-overload]


def neutralise_torch(survivors: Iterable[object], message: str) -> int:
    """Free what surviving modules and tensors pin; make the modules refuse to run.

    Surviving modules move to ``meta`` behind a pre-hook that raises
    :class:`ModelStateError` with ``message``; their old parameters, and any
    surviving tensor, are emptied by :func:`free_storages`.

    Returns:
        Bytes released (each storage once).
    """
    modules = [s for s in survivors if isinstance(s, torch.nn.Module)]
    tensors = [s for s in survivors if isinstance(s, torch.Tensor)]
    for module in modules:
        tensors.extend(module_tensors(module))
    for module in modules:
        disable_module(module, message)
    return free_storages(tensors)


def disable_module(module: torch.nn.Module, message: str) -> None:
    """Move ``module`` to ``meta`` and make calling it raise :class:`ModelStateError`."""

    def refuse(_module: torch.nn.Module, _args: object) -> None:
        raise ModelStateError(message)

    for sub in module.modules():
        for name, value in list(vars(sub).items()):
            if isinstance(value, torch.Tensor) and not value.is_meta:
                setattr(sub, name, value.to("meta"))
    module.to("meta")
    module.register_forward_pre_hook(refuse)
