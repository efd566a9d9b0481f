"""The host reading: RSS from one statm read, slow fields throttled, an exact peak once reset."""

from __future__ import annotations

import math
import mmap
import sys

import psutil
import pytest

import vramkit
from vramkit.devices import (
    BackendBase,
    DeviceMemory,
    register_backend,
    resolve_device,
    unregister_backend,
)
from vramkit.devices import cpu as cpu_module
from vramkit.devices.cpu import CpuBackend
from vramkit.errors import InvalidArgumentError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
MiB = 1024**2
PAGE = mmap.PAGESIZE


def _touched(size: int) -> bytearray:
    block = bytearray(size)
    for offset in range(0, size, PAGE):  # resident, page by page
        block[offset] = 1
    return block


@pytest.fixture
def throttled_for_ever(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the first read re-reads the slow fields: what comes later is statm's alone."""
    monkeypatch.setattr(cpu_module, "THROTTLE_SECONDS", math.inf)


@linux
@pytest.mark.usefixtures("throttled_for_ever")
def test_rss_from_statm_is_within_a_page_of_psutils() -> None:
    backend = CpuBackend()
    backend.read()  # the first read takes the slow fields too
    process = psutil.Process()
    before = process.memory_info().rss
    ours = backend.read().process_used_bytes
    after = process.memory_info().rss
    assert ours is not None
    assert min(before, after) - PAGE <= ours <= max(before, after) + PAGE


@linux
@pytest.mark.usefixtures("throttled_for_ever")
def test_the_peak_never_falls_below_what_statm_saw() -> None:
    backend = CpuBackend()
    backend.read()
    block = _touched(32 * MiB)
    reading = backend.read()
    assert reading.process_peak_bytes is not None and reading.process_used_bytes is not None
    assert reading.process_peak_bytes >= reading.process_used_bytes
    del block


@linux
@pytest.mark.usefixtures("throttled_for_ever")
def test_after_a_reset_the_peak_is_exact_even_for_a_spike_between_reads() -> None:
    backend = CpuBackend()
    backend.reset_peak()
    start = backend.read()
    if start.process_peak_bytes is None or start.process_used_bytes is None:
        pytest.skip("this system reports no peak resident set size")
    if start.process_peak_bytes - start.process_used_bytes > 16 * MiB:
        pytest.skip("this system does not let the peak be reset")
    block = _touched(64 * MiB)
    del block  # the spike is over before the next read: only VmHWM saw it
    end = backend.read()
    assert end.process_peak_bytes is not None
    assert end.process_peak_bytes >= start.process_used_bytes + 60 * MiB


@linux
@pytest.mark.usefixtures("throttled_for_ever")
def test_available_memory_is_read_again_when_rss_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    # Counted, not compared: the system-wide figure also moves with every
    # other process, so equal or unequal values prove nothing either way.
    backend = CpuBackend()
    reader = backend._proc
    assert reader is not None
    system_reads = 0
    read_system = reader._read_system

    def counting(rss: int, now: float) -> None:
        nonlocal system_reads
        system_reads += 1
        read_system(rss, now)

    monkeypatch.setattr(reader, "_read_system", counting)
    before = backend.read()
    assert system_reads == 1  # the first read reads everything
    backend.read()
    assert system_reads == 1  # throttled, and RSS has not moved
    # A new mapping, so that RSS moves whatever the allocator kept from earlier tests.
    with mmap.mmap(-1, 64 * MiB) as block:
        for offset in range(0, 64 * MiB, PAGE):
            block[offset] = 1
        after = backend.read()
    assert after.process_used_bytes is not None and before.process_used_bytes is not None
    assert after.process_used_bytes - before.process_used_bytes >= 32 * MiB
    assert system_reads == 2  # re-read, though the throttle would not


def test_without_proc_psutil_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_module.sys, "platform", "darwin")
    backend = CpuBackend()
    process = psutil.Process()
    before = process.memory_info().rss
    reading = backend.read()
    after = process.memory_info().rss
    assert isinstance(reading, DeviceMemory)
    assert reading.process_used_bytes is not None
    assert min(before, after) - PAGE <= reading.process_used_bytes <= max(before, after) + PAGE
    assert reading.total_bytes == psutil.virtual_memory().total
    backend.reset_peak()  # nothing to reset there, and no error


def test_a_resolved_name_is_resolved_once_and_forgotten_with_its_backend() -> None:
    assert resolve_device("cpu") is resolve_device("cpu")
    assert vramkit.snapshot("cpu")["cpu"].total_bytes is not None

    class Board(BackendBase):
        kind, indexed = "board", True

        def is_available(self) -> bool:
            return True

        def device_count(self) -> int:
            return 1

        def read(self, index: int) -> DeviceMemory:
            return DeviceMemory(f"board:{index}", used_bytes=0, total_bytes=1)

        def empty_cache(self, index: int) -> None:
            pass

        def synchronize(self, index: int) -> None:
            pass

        def reset_peak(self, index: int) -> None:
            pass

    register_backend(Board())
    try:
        assert str(resolve_device("board:0")) == "board:0"
    finally:
        unregister_backend("board")
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        resolve_device("board:0")
