"""What an adapter must answer, and the default answers most adapters share."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = ["Adapter", "AdapterBase"]


@runtime_checkable
class Adapter(Protocol):
    """Knows how to measure, release and neutralise one kind of object that holds memory.

    Adapters are looked up through :func:`vramkit.adapters.adapter_for`; a new
    kind of object joins with :func:`vramkit.adapters.register_adapter`.
    """

    name: str
    """A short name for reports, such as ``"torch"`` or ``"onnxruntime"``."""

    def matches(self, obj: object) -> bool:
        """Whether this adapter handles ``obj``. Must not import heavy packages."""
        ...

    def size_bytes(self, obj: object) -> int | None:
        """Bytes ``obj`` holds (weights, buffers), or ``None`` when it cannot tell."""
        ...

    def tensors(self, obj: object) -> Sequence[torch.Tensor]:
        """The torch tensors ``obj`` owns, for proving they died and freeing them if not."""
        ...

    def handles(self, obj: object) -> Sequence[object]:
        """Objects besides ``obj`` whose death proves its memory is gone (native handles)."""
        ...

    def modules(self, obj: object) -> Mapping[str, torch.nn.Module]:
        """The torch modules holding ``obj``'s weights, by name, for the offload tiers.

        Empty when ``obj`` has none: it can then only be dropped and rebuilt.
        """
        ...

    def release(self, obj: object) -> Mapping[str, int | None] | None:
        """Tear ``obj`` down before vramkit drops its reference (close files, free handles).

        Returns:
            ``None``, or bytes it gave back per layer where only it can tell
            (an ended worker process: ``{"worker": bytes}``); the unload report
            adds them to its ``freed_bytes``.
        """
        ...

    def neutralise(self, survivors: Sequence[object], message: str) -> int:
        """Make objects that outlived unloading pin no memory and fail loudly when used.

        Args:
            survivors: ``obj`` and/or handles that are still alive after unloading.
            message: What to say when a stale reference is used.

        Returns:
            Bytes released.
        """
        ...


class AdapterBase:
    """Defaults: no tensors, no native handles, nothing to release, nothing to neutralise."""

    name = "object"

    def matches(self, obj: object) -> bool:
        """Match nothing; subclasses decide."""
        return False

    def size_bytes(self, obj: object) -> int | None:
        """Unknown unless a subclass can tell."""
        return None

    def tensors(self, obj: object) -> Sequence[torch.Tensor]:
        """No tensors."""
        return ()

    def handles(self, obj: object) -> Sequence[object]:
        """No native handles."""
        return ()

    def modules(self, obj: object) -> Mapping[str, torch.nn.Module]:
        """No torch modules: offloading drops and rebuilds."""
        return {}

    def release(self, obj: object) -> Mapping[str, int | None] | None:
        """Nothing to tear down: dropping the reference is enough."""
        return None

    def neutralise(self, survivors: Sequence[object], message: str) -> int:
        """Nothing this adapter can do for a survivor; the report names its holders."""
        return 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r}>"


def type_path(obj: object) -> str:
    """``module.QualName`` of ``obj``'s type, for matching without importing its package."""
    kind: Any = type(obj)
    return f"{kind.__module__}.{kind.__qualname__}"
