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

import functools
import gc
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

from vramkit._gc import exclusive
from vramkit.adapters._base import AdapterBase, type_path
from vramkit.errors import InvalidArgumentError, MissingDependencyError, ModelStateError

__all__ = [
    "PATH_KEYS",
    "OnnxRuntimeAdapter",
    "UnloadedSession",
    "check_onnx_path",
    "default_providers",
    "device_from_providers",
    "onnx_loader",
]

PATH_KEYS = ("path",)
"""The configuration key ``from_onnx`` stores the model file under."""


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


def check_onnx_path(path: object) -> Path:
    """The model file ``from_onnx`` was given, checked before anything loads.

    Raises:
        MissingDependencyError: onnxruntime is not installed.
        InvalidArgumentError: ``path`` is not an existing file.
    """
    import importlib.util

    if importlib.util.find_spec("onnxruntime") is None:
        raise MissingDependencyError("onnxruntime", "onnx", "ManagedModel.from_onnx")
    if not isinstance(path, str | os.PathLike):
        raise InvalidArgumentError(f"path must be a path to an .onnx file; got {path!r}")
    file = Path(path)
    if not file.is_file():
        raise InvalidArgumentError(f"ONNX model {str(file)!r} does not exist or is not a file")
    return file


def device_from_providers(providers: list[Any] | None) -> str | None:
    """The device execution providers point at: ``cuda:N``, ``cpu``, or ``None`` without any.

    Raises:
        InvalidArgumentError: ``providers`` is not a list of names or
            ``(name, options)`` pairs, as ONNX Runtime takes them.
    """
    for name, options in check_providers(providers):
        if name == "CUDAExecutionProvider":
            return f"cuda:{options.get('device_id', 0)}"
    return "cpu" if providers else None


def check_providers(providers: object) -> list[tuple[str, Mapping[str, Any]]]:
    """``providers`` as ``(name, options)`` pairs, checked (an empty list for ``None``)."""
    if providers is None:
        return []
    expected = (
        "providers must be a list of execution provider names or (name, options) pairs, "
        "such as ['CUDAExecutionProvider', 'CPUExecutionProvider']"
    )
    if isinstance(providers, str) or not isinstance(providers, list | tuple):
        raise InvalidArgumentError(f"{expected}; got {providers!r}")
    pairs: list[tuple[str, Mapping[str, Any]]] = []
    for provider in providers:
        if isinstance(provider, str):
            pairs.append((provider, {}))
        elif (
            isinstance(provider, tuple | list)
            and len(provider) == 2
            and isinstance(provider[0], str)
            and isinstance(provider[1], Mapping)
        ):
            pairs.append((provider[0], provider[1]))
        else:
            raise InvalidArgumentError(f"{expected}; got {provider!r} in it")
    device_ids = [o.get("device_id", 0) for n, o in pairs if n == "CUDAExecutionProvider"]
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in device_ids):
        raise InvalidArgumentError(
            f"providers: device_id must be a whole number >= 0; got {providers!r}"
        )
    return pairs


def check_provider_options(options: object, providers: list[Any] | None) -> None:
    """``provider_options``: ``None``, or one dict per provider, as ONNX Runtime takes them."""
    if options is None:
        return
    if not isinstance(options, list | tuple) or not all(isinstance(o, Mapping) for o in options):
        raise InvalidArgumentError(
            f"provider_options must be a list of dicts, one per provider, or None; got {options!r}"
        )
    if providers is not None and len(options) != len(providers):
        raise InvalidArgumentError(
            f"provider_options must have one dict per provider ({len(providers)}); "
            f"got {len(options)}"
        )


def default_providers(kind: str, index: int | None) -> list[Any]:
    """CUDA (with ``device_id``) then CPU on a ``cuda`` device; CPU alone elsewhere."""
    if kind == "cuda":
        return [("CUDAExecutionProvider", {"device_id": index or 0}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def onnx_loader(
    file: Path,
    *,
    providers: list[Any],
    sess_options: Any,
    provider_options: list[dict[str, Any]] | None,
    arena: bool,
) -> tuple[Callable[[], Any], dict[str, Any]]:
    """The loader ``from_onnx`` manages: a new ``InferenceSession`` with the same options.

    Returns:
        The loader, and the configuration it closes over (for ``mm.config``).
    """
    chosen = list(providers)
    # A partial, not a closure: an isolated model's loader is pickled to its worker.
    load_onnx = functools.partial(
        _load_onnx, str(file), sess_options, chosen, provider_options, arena
    )
    return load_onnx, {"path": str(file), "providers": chosen, "arena": arena}


def _load_onnx(
    path: str,
    sess_options: Any,
    providers: list[Any],
    provider_options: list[dict[str, Any]] | None,
    arena: bool,
) -> Any:
    from vramkit._optional import require

    ort = require("onnxruntime", "ManagedModel.from_onnx")
    session_options = sess_options if sess_options is not None else ort.SessionOptions()
    if not arena:
        session_options.enable_cpu_mem_arena = False
    return ort.InferenceSession(
        path,
        sess_options=session_options,
        providers=providers,
        provider_options=provider_options,
    )
