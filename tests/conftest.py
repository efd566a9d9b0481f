"""Shared test setup: hardware markers skip where the hardware is absent, and a cache of its own."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
import torch

_OWN_CACHE = pytest.StashKey[str]()


def pytest_configure(config: pytest.Config) -> None:
    # Disk tiers and demo builds go to a folder of this run's (inherited by
    # xdist workers and subprocesses), never the user's cache.
    if "VRAMKIT_CACHE_DIR" not in os.environ:
        folder = tempfile.mkdtemp(prefix="vramkit-tests-")
        os.environ["VRAMKIT_CACHE_DIR"] = folder
        config.stash[_OWN_CACHE] = folder


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = config.stash.get(_OWN_CACHE, None)
    if folder is not None:
        os.environ.pop("VRAMKIT_CACHE_DIR", None)
        shutil.rmtree(folder, ignore_errors=True)


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


@pytest.fixture(scope="session")
def funasr_module() -> object:
    """funasr, imported once per test session (about 7 s); skips where it is missing."""
    pytest.importorskip("kaldi_native_fbank")
    return pytest.importorskip("funasr")


@pytest.fixture(scope="session")
def funasr_pipeline(funasr_module: object, tmp_path_factory: pytest.TempPathFactory) -> object:
    """Tiny VAD + ASR + punctuation model directories, built offline once per session."""
    from vramkit.testing.models import build_funasr_pipeline

    return build_funasr_pipeline(tmp_path_factory.mktemp("funasr"))


@pytest.fixture
def channels() -> Iterator[tuple[Any, Any]]:
    """Both ends of an isolation channel over a socket pair, closed after the test."""
    import socket

    from vramkit.isolation._transport import Channel

    a, b = socket.socketpair()
    ends = Channel(a), Channel(b)
    yield ends
    for end in ends:
        end.close()
