"""``torch.nn.Module``: size from parameters and buffers; survivors moved to ``meta``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vramkit.adapters._base import AdapterBase
from vramkit.adapters._torch_util import module_tensors, neutralise_torch, storage_bytes

__all__ = ["TorchAdapter"]


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
