"""Shared test setup: hardware markers skip where the hardware is absent."""

from __future__ import annotations

import pytest
import torch


def _has_mps() -> bool:
    return bool(torch.backends.mps.is_available())


_HARDWARE = {
    "cuda": (torch.cuda.is_available, "needs an NVIDIA GPU (torch.cuda.is_available() is False)"),
    "mps": (_has_mps, "needs Apple's MPS backend"),
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, (available, reason) in _HARDWARE.items():
        if available():
            continue
        skip = pytest.mark.skip(reason=reason)
        for item in items:
            if item.get_closest_marker(marker) is not None:
                item.add_marker(skip)
