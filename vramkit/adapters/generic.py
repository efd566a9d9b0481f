"""Anything with its own teardown: TensorRT engines and contexts, llama.cpp handles...

``GenericAdapter(release=..., size=...)`` takes the two things vramkit cannot
guess: how to free the object, and how big it is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vramkit.adapters._base import AdapterBase
from vramkit.errors import InvalidArgumentError

__all__ = ["GenericAdapter"]


class GenericAdapter(AdapterBase):
    """An adapter built from callables.

    Args:
        release: Called with the object when it is unloaded, before vramkit
            drops its reference (``engine.__del__``, ``llama_free``, ``ctx.close``).
        size: Called with the object; returns its bytes (or ``None``).
        name: A name for reports.

    Example:
        >>> adapter = GenericAdapter(release=lambda handle: handle.close(), size=lambda h: 1024)
    """

    def __init__(
        self,
        *,
        release: Callable[[Any], object] | None = None,
        size: Callable[[Any], int | None] | None = None,
        name: str = "generic",
    ) -> None:
        for label, fn in (("release", release), ("size", size)):
            if fn is not None and not callable(fn):
                raise InvalidArgumentError(
                    f"{label} must be a callable taking the loaded object; got {fn!r}"
                )
        self._release = release
        self._size = size
        self.name = name

    def matches(self, obj: object) -> bool:
        """Anything: a generic adapter is given explicitly, never looked up."""
        return True

    def size_bytes(self, obj: object) -> int | None:
        """What ``size(obj)`` says, or ``None`` without one."""
        if self._size is None:
            return None
        value = self._size(obj)
        if value is not None and (not isinstance(value, int) or value < 0):
            raise InvalidArgumentError(
                f"size callable must return a non-negative int of bytes or None; got {value!r}"
            )
        return value

    def release(self, obj: object) -> None:
        """Call ``release(obj)``."""
        if self._release is not None:
            self._release(obj)
