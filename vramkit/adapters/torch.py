"""``torch.nn.Module``: size from parameters and buffers; survivors freed and made loud.

Models dispatched by accelerate (``dispatch_model``, ``cpu_offload``,
``load_checkpoint_and_dispatch``) are recognised by the hooks accelerate puts
on their modules: they are never moved (accelerate placed them), the weights
the hooks keep in memory count in their size, and the offload tiers drop and
rebuild them, since their parameters are ``meta`` placeholders.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vramkit.adapters._base import AdapterBase
from vramkit.adapters._torch_util import (
    is_tombstone,
    module_tensors,
    neutralise_torch,
    storage_bytes,
)
from vramkit.errors import InvalidArgumentError, ModelStateError

__all__ = ["TorchAdapter", "check_torch_factory", "dispatched", "torch_loader"]


class TorchAdapter(AdapterBase):
    """Any ``nn.Module``: a whole model, a pipeline stage, a vocoder."""

    name = "torch"

    def matches(self, obj: object) -> bool:
        """Modules of any kind."""
        return isinstance(obj, torch.nn.Module)

    def size_bytes(self, obj: object) -> int | None:
        """Bytes of distinct parameter and buffer storages (tied weights once)."""
        return storage_bytes(self.tensors(obj))

    def tensors(self, obj: object) -> Sequence[torch.Tensor]:
        """Parameters, buffers and plain tensor attributes, and what accelerate's hooks hold."""
        assert isinstance(obj, torch.nn.Module)
        return [*module_tensors(obj), *_hook_tensors(obj)]

    def modules(self, obj: object) -> Mapping[str, torch.nn.Module]:
        """The module itself; none for a model accelerate dispatched (its weights are hooks')."""
        assert isinstance(obj, torch.nn.Module)
        return {} if dispatched(obj) else {"": obj}

    def neutralise(self, survivors: Sequence[object], message: str) -> int:
        """Surviving modules go to ``meta`` and refuse to run; surviving tensors are emptied."""
        return neutralise_torch(survivors, message)


def check_torch_factory(factory: object, dtype: object) -> None:
    """Refuse what ``ManagedModel.from_torch`` cannot rebuild: a module instead of a factory.

    Raises:
        InvalidArgumentError: ``factory`` is a module or not callable, or
            ``dtype`` is not a ``torch.dtype``.
    """
    if isinstance(factory, torch.nn.Module):
        raise InvalidArgumentError(
            "from_torch needs a factory (a zero-argument callable that builds the module), "
            "not the module itself, so the module can be rebuilt after unloading; "
            f"e.g. from_torch(lambda: {type(factory).__name__}(...))"
        )
    if not callable(factory):
        raise InvalidArgumentError(
            f"factory must be a zero-argument callable returning an nn.Module; got {factory!r}"
        )
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(f"dtype must be a torch.dtype; got {dtype!r}")


def torch_loader(
    factory: Callable[[], torch.nn.Module],
    *,
    device: str,
    dtype: torch.dtype | None,
    eval: bool,
) -> tuple[Callable[[], torch.nn.Module], dict[str, Any]]:
    """The loader ``from_torch`` manages: build, move to ``device`` (and ``dtype``), eval.

    ``device`` is parsed by torch at each load, so a device kind torch does
    not know fails when the model loads, not when it is declared.

    Returns:
        The loader, and the configuration it closes over (for ``mm.config``).
    """
    # A partial of a module-level function, not a closure: an isolated model's
    # loader is pickled to its worker process.
    load_torch = functools.partial(_load_torch, factory, device, dtype, eval)
    config = {"factory": getattr(factory, "__qualname__", repr(factory)), "dtype": dtype}
    return load_torch, config


def _load_torch(
    factory: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype | None, eval: bool
) -> torch.nn.Module:
    module = factory()
    if not isinstance(module, torch.nn.Module):
        raise InvalidArgumentError(
            f"from_torch factory must return a torch.nn.Module; got {type(module).__name__}"
        )
    if any(is_tombstone(t) for t in module_tensors(module)):
        raise ModelStateError(
            "the factory returned the object vramkit unloaded before (its memory was "
            "freed); a factory must build a new module at each call, so drop the cache that "
            "keeps it (functools.lru_cache, a global)"
        )
    if dispatched(module):
        if dtype is not None:
            raise InvalidArgumentError(
                "from_torch: the factory returned a model dispatched by accelerate (its "
                "weights live in hooks), which cannot be cast with dtype=; load it in the "
                "dtype wanted instead (from_pretrained(..., torch_dtype=...))"
            )
    else:  # accelerate placed a dispatched model: moving it would break its hooks
        module = module.to(device=torch.device(device), dtype=dtype)
    return module.eval() if eval else module


def dispatched(module: torch.nn.Module) -> bool:
    """Whether accelerate's hooks manage ``module`` (placement, offloaded weights)."""
    return any("_hf_hook" in vars(sub) for sub in module.modules())


def _hook_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The weights accelerate's hooks keep in memory (not those in its disk folder)."""
    found: list[torch.Tensor] = []
    seen: set[int] = set()
    for sub in module.modules():
        for hook in _hooks(vars(sub).get("_hf_hook")):
            dataset = getattr(getattr(hook, "weights_map", None), "dataset", None)
            # cpu_offload keeps a dict; disk offload an OffloadedWeightsLoader whose
            # state_dict holds what is in memory (the rest is read from files).
            in_memory = dataset if isinstance(dataset, dict) else getattr(dataset, "state_dict", 0)
            if not isinstance(in_memory, dict) or id(in_memory) in seen:
                continue
            seen.add(id(in_memory))
            found.extend(v for v in in_memory.values() if isinstance(v, torch.Tensor))
    return found


def _hooks(hook: object) -> list[object]:
    """A hook, or the hooks of accelerate's SequentialHook."""
    if hook is None:
        return []
    inner = getattr(hook, "hooks", None)
    return list(inner) if isinstance(inner, list | tuple) else [hook]
