"""What holds memory: one adapter per kind of object, found through a registry.

Built in, tried in this order: a model in a worker process (``isolate=True``),
FunASR ``AutoModel``, ONNX Runtime
``InferenceSession``, torch ``nn.Module``, and a fallback for any other object
(measured through the torch modules and tensors in its attributes). Anything
with its own teardown gets a :class:`GenericAdapter` with ``release=`` and
``size=``. A new kind joins with :func:`register_adapter` (and leaves with
:func:`unregister_adapter`); nothing in vramkit branches on types by name.
"""

from __future__ import annotations

import threading

from vramkit.adapters._base import Adapter, AdapterBase
from vramkit.adapters.funasr import FunasrAdapter
from vramkit.adapters.generic import GenericAdapter
from vramkit.adapters.objects import ObjectAdapter
from vramkit.adapters.onnxruntime import OnnxRuntimeAdapter
from vramkit.adapters.torch import TorchAdapter
from vramkit.adapters.worker import WorkerAdapter
from vramkit.errors import InvalidArgumentError

__all__ = [
    "Adapter",
    "AdapterBase",
    "FunasrAdapter",
    "GenericAdapter",
    "ObjectAdapter",
    "OnnxRuntimeAdapter",
    "TorchAdapter",
    "WorkerAdapter",
    "adapter_for",
    "register_adapter",
    "unregister_adapter",
]

_lock = threading.Lock()
_adapters: tuple[Adapter, ...] = (
    WorkerAdapter(),
    FunasrAdapter(),
    OnnxRuntimeAdapter(),
    TorchAdapter(),
)
_fallback: Adapter = ObjectAdapter()


def register_adapter(adapter: Adapter) -> None:
    """Make a kind of object manageable; it is tried before the built-in adapters.

    Raises:
        InvalidArgumentError: When ``adapter`` does not answer :class:`Adapter`.
    """
    global _adapters
    if not isinstance(adapter, Adapter):
        raise InvalidArgumentError(
            "adapter must implement vramkit.adapters.Adapter (name, matches, size_bytes, "
            f"tensors, handles, release, neutralise); got {adapter!r}"
        )
    with _lock:
        _adapters = (adapter, *(a for a in _adapters if a is not adapter))


def unregister_adapter(adapter: Adapter) -> None:
    """Forget ``adapter``: :func:`adapter_for` no longer returns it (a no-op if not registered)."""
    global _adapters
    with _lock:
        _adapters = tuple(a for a in _adapters if a is not adapter)


def adapter_for(obj: object) -> Adapter:
    """The first registered adapter that matches ``obj`` (the object fallback otherwise)."""
    for adapter in _adapters:
        if adapter.matches(obj):
            return adapter
    return _fallback
