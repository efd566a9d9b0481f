"""The scripted FakeDevice: it must behave like a small caching allocator, and install cleanly."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from vramkit.cleaning import cleanup
from vramkit.devices import DeviceBackend, DeviceMemory, get_backend, resolve_device
from vramkit.errors import InvalidArgumentError
from vramkit.memory import snapshot
from vramkit.oom import is_oom_error
from vramkit.testing.fake import FakeDevice

MIB = 1 << 20
GIB = 1 << 30


def test_answers_the_device_protocol_and_installs_for_a_block() -> None:
    fake = FakeDevice(count=2, total="1GiB")
    assert isinstance(fake, DeviceBackend)
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        resolve_device("fake:0")
    with fake.install() as installed:
        assert installed is fake
        assert str(resolve_device("fake:1")) == "fake:1"
        reading = snapshot("fake:1")["fake:1"]
        assert reading.total_bytes == GIB
        assert reading.used_bytes == 0
        assert reading.free_bytes == GIB
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        resolve_device("fake:0")


def test_allocations_go_through_a_cache_like_torchs() -> None:
    fake = FakeDevice(total="1GiB")
    fake.allocate("100MiB")
    fake.free(40 * MIB)
    reading = fake.read(0)
    assert reading.allocated_bytes == 60 * MIB
    assert reading.reserved_bytes == 100 * MIB  # freed bytes stay cached
    assert reading.cache_bytes == 40 * MIB
    assert reading.peak_allocated_bytes == 100 * MIB
    fake.allocate(30 * MIB)  # served from the cache: nothing new reserved
    assert fake.read(0).reserved_bytes == 100 * MIB
    fake.empty_cache(0)
    assert fake.read(0).reserved_bytes == 90 * MIB
    fake.reset_peak(0)
    assert fake.read(0).peak_allocated_bytes == 90 * MIB
    fake.cache("10MiB")
    assert fake.read(0).reserved_bytes == 100 * MIB
    assert fake.read(0).allocated_bytes == 90 * MIB


def test_outside_and_other_processes_show_in_the_driver_layers_only() -> None:
    fake = FakeDevice(total="1GiB")
    fake.allocate("100MiB")
    fake.set_outside("50MiB")  # a context, an ONNX Runtime arena
    fake.set_others("200MiB")  # another process
    reading = fake.read(0)
    assert reading.allocated_bytes == 100 * MIB
    assert reading.process_used_bytes == 150 * MIB
    assert reading.used_bytes == 350 * MIB
    assert reading.free_bytes == GIB - 350 * MIB
    assert reading.used_fraction == pytest.approx(350 / 1024)


def test_allocating_past_the_total_raises_a_real_torch_oom() -> None:
    fake = FakeDevice(total="1GiB")
    fake.allocate("800MiB")
    fake.set_others("100MiB")
    with pytest.raises(torch.OutOfMemoryError, match="fake:0 out of memory") as info:
        fake.allocate("200MiB")
    assert is_oom_error(info.value)
    reading = fake.read(0)
    assert reading.allocated_bytes == 800 * MIB  # a failed allocation changes nothing
    fake.allocate("124MiB")  # exactly what is left still fits
    assert fake.read(0).free_bytes == 0


def test_scripted_readings_come_first_in_order() -> None:
    fake = FakeDevice(total="8GiB")
    fake.allocate("1GiB")
    exact = DeviceMemory(device="ignored", used_bytes=5 * GIB, total_bytes=8 * GIB)
    fake.script({"used_bytes": 7 * GIB}, exact)
    first, second, third = fake.read(0), fake.read(0), fake.read(0)
    assert first.used_bytes == 7 * GIB
    assert first.allocated_bytes == GIB  # fields left out: the state when scripted
    assert second.used_bytes == 5 * GIB
    assert second.device == "fake:0"
    assert second.allocated_bytes is None  # a DeviceMemory is taken as it is
    assert third.used_bytes == GIB  # the queue is empty: computed again
    assert fake.read_calls == 3


def test_counts_the_calls_a_cleanup_makes() -> None:
    fake = FakeDevice()
    with fake.install():
        fake.allocate("64MiB")
        fake.free("64MiB")
        report = cleanup("fake:0")
    assert fake.synchronize_calls == 1
    assert fake.empty_cache_calls == 1
    assert fake.reset_peak_calls == 0
    assert report.freed_bytes("fake:0", "reserved") == 64 * MIB


def test_install_replace_puts_the_previous_backend_back() -> None:
    first, second = FakeDevice(total="1GiB"), FakeDevice(total="2GiB")
    with first.install():
        with pytest.raises(InvalidArgumentError, match="already registered"):
            second.install().__enter__()
        with second.install(replace=True):
            assert get_backend("fake") is second
        assert get_backend("fake") is first
    with pytest.raises(InvalidArgumentError, match="unknown device kind"):
        get_backend("fake")


def test_another_kind_name() -> None:
    fake = FakeDevice("npu", count=3)
    with fake.install():
        assert snapshot("npu:2")["npu:2"].total_bytes == 8 * GIB


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"kind": "Fake GPU"}, "kind"),
        ({"kind": ""}, "kind"),
        ({"count": 0}, "count"),
        ({"count": True}, "count"),
        ({"total": "lots"}, "total"),
        ({"total": 0}, "total"),
        ({"total": -1}, "total"),
    ],
)
def test_bad_construction(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        FakeDevice(**kwargs)


def test_bad_scripting() -> None:
    fake = FakeDevice(count=2, total="1GiB")
    with pytest.raises(InvalidArgumentError, match="nbytes"):
        fake.allocate(-1)
    with pytest.raises(InvalidArgumentError, match="nbytes"):
        fake.allocate("a lot")
    with pytest.raises(InvalidArgumentError, match="only 0 B allocated"):
        fake.free("1MiB")
    with pytest.raises(InvalidArgumentError, match="index"):
        fake.allocate("1MiB", index=2)
    with pytest.raises(InvalidArgumentError, match="index"):
        fake.read(-1)
    with pytest.raises(InvalidArgumentError, match="unknown DeviceMemory fields"):
        fake.script({"usedbytes": 1})
    with pytest.raises(InvalidArgumentError, match="int of bytes"):
        fake.script({"used_bytes": "1GiB"})  # type: ignore[dict-item]
    with pytest.raises(InvalidArgumentError, match="DeviceMemory or a mapping"):
        fake.script(42)  # type: ignore[arg-type]
