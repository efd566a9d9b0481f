"""Any other object: the torch modules and tensors found in its attributes.

A TTS wrapper, a ``transformers`` pipeline or an application class that keeps
its ``nn.Module`` in ``self.model`` is measured and freed through the modules
it holds (searched two levels deep: attributes, and dicts or lists in them).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from vramkit.adapters._base import AdapterBase
from vramkit.adapters._torch_util import modules_in, neutralise_torch, storage_bytes, tensors_in

__all__ = ["ObjectAdapter"]


class ObjectAdapter(AdapterBase):
    """The fallback: matches everything, measures the tensors it can reach."""

    name = "object"

    def matches(self, obj: object) -> bool:
        """Everything (it is tried last)."""
        return True

    def size_bytes(self, obj: object) -> int | None:
        """Bytes of the tensors reachable from ``obj``, or ``None`` if there are none."""
        tensors = self.tensors(obj)
        return storage_bytes(tensors) if tensors else None

    def tensors(self, obj: object) -> Sequence[torch.Tensor]:
        """Tensors in ``obj``'s attributes, and in modules, dicts and lists there."""
        return list(tensors_in(obj))

    def modules(self, obj: object) -> Mapping[str, torch.nn.Module]:
        """Torch modules in ``obj``'s attributes (and in dicts or lists there)."""
        return {f"module{i}": m for i, m in enumerate(modules_in(obj))}

    def neutralise(self, survivors: Sequence[object], message: str) -> int:
        """Disable modules found in surviving objects and empty surviving tensors."""
        found: list[object] = []
        for survivor in survivors:
            found.append(survivor)
            if not isinstance(survivor, torch.nn.Module | torch.Tensor):
                found.extend(
                    value
                    for value in list(getattr(survivor, "__dict__", {}).values())
                    if isinstance(value, torch.nn.Module)
                )
        return neutralise_torch(found, message)
