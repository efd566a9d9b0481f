"""A model's size before its first load: the weight files its configuration names."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vramkit.adapters import funasr, onnxruntime

__all__ = ["WEIGHT_SUFFIXES", "checkpoint_bytes"]

WEIGHT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".onnx", ".ort", ".ckpt", ".gguf")
"""File suffixes counted as weights."""

# Where the from_* constructors (and people writing a config by hand) name their files.
_PATH_KEYS = (*onnxruntime.PATH_KEYS, *funasr.PATH_KEYS)


def checkpoint_bytes(config: Mapping[str, Any]) -> int | None:
    """Bytes of weight files under the paths a model's configuration names, if any."""
    total = 0
    found = False
    for key in _PATH_KEYS:
        value = config.get(key)
        if not isinstance(value, str | os.PathLike):
            continue
        path = Path(value)
        try:
            files = [path] if path.is_file() else list(path.iterdir()) if path.is_dir() else []
        except OSError:
            continue
        for file in files:
            if file.suffix in WEIGHT_SUFFIXES and file.is_file():
                total += file.stat().st_size
                found = True
    return total if found else None
