"""``torch.nn.Module``: size from parameters and buffers; survivors moved to ``meta``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from vramkit.adapters._base import AdapterBase
from vramkit.adapters._torch_util import module_tensors, neutralise_torch, storage_bytes
from vramkit.errors import InvalidArgumentError

__all__ = ["TorchAdapter", "check_torch_factory", "torch_loader"]


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
        """Parameters, buffers and plain tensor attributes of every submodule."""
        assert isinstance(obj, torch.nn.Module)
        return list(module_tensors(obj))

    def modules(self, obj: object) -> Mapping[str, torch.nn.Module]:
        """The module itself."""
        assert isinstance(obj, torch.nn.Module)
        return {"": obj}

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
    use_eval = eval

    def load_torch() -> torch.nn.Module:
        module = factory()
        if not isinstance(module, torch.nn.Module):
            raise InvalidArgumentError(
                f"from_torch factory must return a torch.nn.Module; got {type(module).__name__}"
            )
        module = module.to(device=torch.device(device), dtype=dtype)
        return module.eval() if use_eval else module

    config = {"factory": getattr(factory, "__qualname__", repr(factory)), "dtype": dtype}
    return load_torch, config
