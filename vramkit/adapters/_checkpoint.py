"""A model's size before its first load: the weight files its configuration names.

A safetensors file says in its header exactly how many bytes its tensors
hold, which is read instead of the file's size; other formats count by size.
"""

from __future__ import annotations

import json
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
                total += _weight_bytes(file)
                found = True
    return total if found else None


_MAX_HEADER = 100 * 1024**2  # what the safetensors format itself allows


def _weight_bytes(file: Path) -> int:
    """Tensor bytes a safetensors header declares, else the file's size."""
    size = file.stat().st_size
    if file.suffix != ".safetensors":
        return size
    try:
        with open(file, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if not 0 < length <= min(_MAX_HEADER, size - 8):
                return size
            header = json.loads(fh.read(length))
        ends = [
            int(entry["data_offsets"][1])
            for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict)
        ]
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return size  # not a header we can read: the size is the next best estimate
    return max(ends, default=0)
