"""CUDA backend against a real GPU. Skipped where torch.cuda.is_available() is False."""

from __future__ import annotations

import json

import pytest
import torch

import vramkit
from vramkit.devices import get_backend, resolve_device

from ..helpers import run_python

pytestmark = pytest.mark.cuda

MiB = 1024**2


def test_resolve_cuda_names() -> None:
    assert str(resolve_device("cuda:0")) == "cuda:0"
    assert resolve_device(0) == resolve_device("cuda:0")
    count = torch.cuda.device_count()
    with pytest.raises(vramkit.DeviceUnavailableError, match=f"has {count} CUDA"):
        resolve_device(f"cuda:{count}")


def test_reading_an_untouched_gpu_creates_no_context() -> None:
    out = run_python(
        """
        import json, torch, vramkit
        reading = vramkit.snapshot("cuda:0")["cuda:0"]
        print(json.dumps({"initialized": torch.cuda.is_initialized(),
                          "allocated": reading.allocated_bytes,
                          "total": reading.total_bytes}))
        """
    )
    data = json.loads(out)
    assert data["initialized"] is False
    assert data["allocated"] == 0


def test_allocator_and_driver_layers_both_see_an_allocation() -> None:
    torch.empty(1, device="cuda:0")  # context first, so it does not count below
    vramkit.cleanup("cuda:0")
    before = vramkit.snapshot("cuda:0")
    block = torch.ones(256 * MiB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    after = vramkit.snapshot("cuda:0")
    change = (after - before)["cuda:0"]
    assert change.allocated_bytes is not None and change.allocated_bytes >= 256 * MiB
    assert change.reserved_bytes is not None and change.reserved_bytes >= 256 * MiB
    assert change.used_bytes is not None and change.used_bytes >= 200 * MiB
    reading = after["cuda:0"]
    assert reading.total_bytes is not None and reading.free_bytes is not None
    assert reading.peak_allocated_bytes is not None
    assert reading.peak_allocated_bytes >= reading.allocated_bytes  # type: ignore[operator]
    del block


def test_cleanup_returns_cached_blocks_to_the_driver() -> None:
    block = torch.ones(256 * MiB, dtype=torch.uint8, device="cuda:0")
    torch.cuda.synchronize()
    del block
    cached = vramkit.snapshot("cuda:0")["cuda:0"]
    assert cached.cache_bytes is not None and cached.cache_bytes >= 256 * MiB
    report = vramkit.cleanup("cuda:0")
    freed = report.freed_bytes("cuda:0", "reserved")
    assert freed is not None and freed >= 256 * MiB
    driver = report.freed_bytes("cuda:0", "used")
    assert driver is not None and driver >= 200 * MiB
    assert "empty_cache cuda:0" in report.steps


def test_reset_peak() -> None:
    backend = get_backend("cuda")
    block = torch.ones(64 * MiB, dtype=torch.uint8, device="cuda:0")
    del block
    backend.reset_peak(0)
    reading = backend.read(0)
    assert reading.peak_allocated_bytes == reading.allocated_bytes


def test_live_tensors_sees_cuda_tensors() -> None:
    block = torch.ones(8 * MiB, dtype=torch.uint8, device="cuda:0")
    census = vramkit.live_tensors("cuda:0")
    assert any(t.tensor is block for t in census)
    assert census.by_device()["cuda:0"] >= 8 * MiB


def test_nvml_process_usage_when_available() -> None:
    pytest.importorskip("pynvml")
    torch.empty(1, device="cuda:0")
    reading = vramkit.snapshot("cuda:0")["cuda:0"]
    # None only where NVML hides per-process usage (containers); never 0 with a context
    assert reading.process_used_bytes is None or reading.process_used_bytes > 0
