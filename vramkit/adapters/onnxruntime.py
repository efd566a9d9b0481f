"""ONNX Runtime's ``InferenceSession``: no ``close()`` exists.

Only dropping every reference frees a session, and an ``IOBinding`` made from
it keeps the native session alive through ``IOBinding._session``. So the
adapter proves death on the native handle (``session._sess``) as well as on the
Python wrapper, and a session or binding that outlives unloading has its
native handle swapped for a sentinel that raises a clear error on use, which
lets the native session (and its arena) go.

A session's size is not visible from Python: vramkit measures it as the
memory difference across the load.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence
from typing import Any, NoReturn

from vramkit._gc import exclusive
from vramkit.adapters._base import AdapterBase, type_path
from vramkit.errors import ModelStateError

__all__ = ["OnnxRuntimeAdapter", "UnloadedSession"]


class UnloadedSession:
    """Stands in for a native session that vramkit unloaded; any use raises."""

    __slots__ = ("_message",)

    def __init__(self, message: str) -> None:
        self._message = message

    def __getattr__(self, name: str) -> NoReturn:
        raise ModelStateError(self._message)

    def __repr__(self) -> str:
        return "<unloaded ONNX Runtime session>"


class OnnxRuntimeAdapter(AdapterBase):
    """``onnxruntime.InferenceSession`` (CPU, CUDA or any provider)."""

    name = "onnxruntime"

    def matches(self, obj: object) -> bool:
        """ONNX Runtime sessions, recognised without importing onnxruntime."""
        return type_path(obj).startswith("onnxruntime.") and hasattr(obj, "_sess")

    def handles(self, obj: object) -> Sequence[object]:
        """The native session: while it lives, the memory does."""
        native = getattr(obj, "_sess", None)
        return () if native is None or isinstance(native, UnloadedSession) else (native,)

    def neutralise(self, survivors: Sequence[object], message: str) -> int:
        """Detach surviving sessions and IO bindings from the native session."""
        natives: list[Any] = []
        for survivor in survivors:
            if self.matches(survivor):
                natives.extend(self.handles(survivor))
                survivor._sess = UnloadedSession(message)  # type: ignore[attr-defined]
            elif type_path(survivor).startswith("onnxruntime.capi."):
                natives.append(survivor)
        with exclusive():  # holders come from gc.get_referrers: see vramkit._gc
            for native in natives:
                for holder in _attribute_holders(native):
                    # IOBinding keeps `_session` (the native session) and `_iobinding`.
                    if getattr(holder, "_session", None) is native:
                        holder._session = UnloadedSession(message)
                        holder._iobinding = UnloadedSession(message)
                    elif self.matches(holder) and getattr(holder, "_sess", None) is native:
                        holder._sess = UnloadedSession(message)
                holder = None
        return 0


def _attribute_holders(target: object) -> list[Any]:
    """Objects holding ``target`` in an attribute, whether their ``__dict__`` is inline or not."""
    holders: list[Any] = []
    for holder in gc.get_referrers(target):
        if isinstance(holder, dict):
            holders.extend(
                owner
                for owner in gc.get_referrers(holder)
                if getattr(owner, "__dict__", None) is holder
            )
        else:
            holders.append(holder)
    return holders
