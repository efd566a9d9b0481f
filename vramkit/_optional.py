"""Lazy imports of optional dependencies, with errors that name the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

from vramkit.errors import MissingDependencyError

__all__ = ["require"]

# import name -> vramkit extra that installs it
_EXTRAS = {
    "funasr": "funasr",
    "kaldi_native_fbank": "funasr",
    "sentencepiece": "funasr",  # these two come with funasr
    "yaml": "funasr",
    "onnxruntime": "onnx",
    "onnx": "onnx",
    "pynvml": "nvml",
    "matplotlib": "plot",
    "fastapi": "http",
    "uvicorn": "http",
    "prometheus_client": "http",
}


def require(module: str, purpose: str, *, extra: str | None = None) -> ModuleType:
    """Import ``module`` or raise :class:`MissingDependencyError` naming the extra.

    Args:
        module: Dotted import name, such as ``"onnxruntime"``.
        purpose: What needs it, for the message, such as ``"ManagedModel.from_onnx"``.
        extra: The extra to name, where it depends on the purpose rather than
            the module (numpy comes with ``funasr`` for audio, with ``onnx``
            for ONNX files); by default the module's own extra.

    Returns:
        The imported module.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        if exc.name is not None and exc.name.partition(".")[0] != top:
            raise  # the package is there but one of *its* imports failed: show that
        raise MissingDependencyError(top, extra or _EXTRAS.get(top, "all"), purpose) from exc
