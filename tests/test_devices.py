from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch

import vramkit
from vramkit import DeviceUnavailableError, InvalidArgumentError
from vramkit.devices import (
    BackendBase,
    Device,
    DeviceBackend,
    DeviceMemory,
    available_devices,
    default_device,
    get_backend,
    register_backend,
    resolve_device,
    unregister_backend,
)
from vramkit.devices.cpu import CpuBackend, malloc_trim

from .helpers import run_python

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answers")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("cpu", "cpu"),
        ("cpu:0", "cpu"),
        (torch.device("cpu"), "cpu"),
        (Device("cpu"), "cpu"),
    ],
)
def test_resolve_device_accepts_torch_spellings(spec: object, expected: str) -> None:
    assert str(resolve_device(spec)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "error", "fragment"),
    [
        ("tpu", InvalidArgumentError, "unknown device 'tpu'; known kinds: cpu, cuda, mps, xpu"),
        ("cuda:-1", InvalidArgumentError, "index must be >= 0"),
        ("cuda:x", InvalidArgumentError, "expected 'kind' or 'kind:index'"),
        ("", InvalidArgumentError, "not a device name"),
        (1.5, InvalidArgumentError, "got 1.5 (float)"),
        (True, InvalidArgumentError, "got True (bool)"),
        (["cpu"], InvalidArgumentError, "(list)"),
        ("cpu:1", DeviceUnavailableError, "there is one cpu"),
        # torch refuses these spellings; so does vramkit, saying what to write instead
        ("CPU", InvalidArgumentError, "lower case: 'cpu'"),
        (" cpu", InvalidArgumentError, "no spaces: 'cpu'"),
        ("cpu ", InvalidArgumentError, "no spaces: 'cpu'"),
        ("cpu:00", InvalidArgumentError, "no leading zeros: 'cpu:0'"),
        ("cuda:01", InvalidArgumentError, "no leading zeros: 'cuda:1'"),
        ("cuda:\u0660", InvalidArgumentError, "not a device name"),
        ("cpu:\uff10", InvalidArgumentError, "not a device name"),
    ],
)
def test_resolve_device_rejects_bad_names(spec: object, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        resolve_device(spec)  # type: ignore[arg-type]
    assert fragment in str(info.value)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:7", 0, torch.device("cuda:1")])
def test_cuda_names_are_unavailable_without_a_gpu(spec: object) -> None:
    with pytest.raises(DeviceUnavailableError, match="not available"):
        resolve_device(spec)  # type: ignore[arg-type]


@no_cuda
def test_default_device_without_accelerator_is_cpu() -> None:
    assert resolve_device(None) == Device("cpu")
    assert available_devices()[0] == Device("cpu")
    assert all(d.kind == "cpu" for d in available_devices())


def test_device_str_and_torch() -> None:
    assert str(Device("cuda", 1)) == "cuda:1"
    assert str(Device("cpu")) == "cpu"
    assert Device("cpu").torch == torch.device("cpu")


def test_cpu_reading_matches_the_os() -> None:
    import psutil

    reading = get_backend("cpu").read(0)
    assert isinstance(reading, DeviceMemory)
    assert reading.device == "cpu"
    # torch keeps no CPU allocator counters: unknown, not zero
    assert reading.allocated_bytes is None
    assert reading.reserved_bytes is None
    assert reading.cache_bytes is None
    rss = psutil.Process().memory_info().rss
    assert reading.process_used_bytes is not None
    assert abs(reading.process_used_bytes - rss) < 64 * 1024**2
    assert reading.total_bytes is not None and reading.free_bytes is not None
    assert reading.total_bytes <= psutil.virtual_memory().total
    assert 0 < reading.free_bytes <= reading.total_bytes
    assert reading.used_bytes == reading.total_bytes - reading.free_bytes
    assert reading.used_fraction is not None and 0 < reading.used_fraction < 1


def test_cpu_reading_sees_a_touched_allocation() -> None:
    # A fresh interpreter: in this one, other tests' background threads may free
    # memory at the same moment and blur the figure.
    out = run_python(
        """
        import torch
        from vramkit.devices import get_backend
        backend = get_backend("cpu")
        before = backend.read(0).process_used_bytes
        block = torch.ones(64 * 1024**2, dtype=torch.uint8)  # touched: pages are resident
        after = backend.read(0).process_used_bytes
        print(after - before)
        """
    )
    assert int(out) >= 60 * 1024**2


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="Linux peak RSS reset")
def test_cpu_reset_peak_restarts_the_high_water_mark() -> None:
    backend = get_backend("cpu")
    block = torch.ones(128 * 1024**2, dtype=torch.uint8)
    del block
    high = backend.read(0).process_peak_bytes
    backend.reset_peak(0)
    low = backend.read(0).process_peak_bytes
    assert high is not None and low is not None
    assert low < high


def test_cpu_backend_reopens_proc_files_after_fork() -> None:
    backend = CpuBackend()
    parent_rss = backend.read(0).process_used_bytes
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: allocate, read through the inherited backend, report
        os.close(read_fd)
        # plain bytes, not torch: torch's thread pool does not survive fork
        block = b"x" * (256 * 1024**2)
        import psutil

        rss = backend.read(0).process_used_bytes or 0
        truth = psutil.Process().memory_info().rss
        os.write(write_fd, f"{rss} {truth}".encode())
        del block
        os._exit(0)
    os.close(write_fd)
    child_rss, child_truth = (int(x) for x in os.read(read_fd, 64).decode().split())
    os.close(read_fd)
    os.waitpid(pid, 0)
    assert parent_rss is not None
    # the child read its own /proc/self (with its 256 MiB block), not the parent's
    # file descriptors: its reading agrees with psutil's view of the child
    assert abs(child_rss - child_truth) < 16 * 1024**2
    assert child_rss >= 256 * 1024**2


def test_malloc_trim_runs_on_glibc() -> None:
    import platform

    expected = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert malloc_trim() is expected


def test_registry_rejects_non_backends_and_duplicates() -> None:
    with pytest.raises(InvalidArgumentError, match="must implement"):
        register_backend(object())  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="already registered"):
        register_backend(CpuBackend())
    with pytest.raises(InvalidArgumentError, match="unknown device kind"):
        get_backend("tpu")


class _ScriptedBackend:
    kind = "scripted"
    indexed = True

    def __init__(self) -> None:
        self.emptied: list[int] = []

    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return 2

    def read(self, index: int) -> DeviceMemory:
        return DeviceMemory(device=f"scripted:{index}", allocated_bytes=index, total_bytes=100)

    def empty_cache(self, index: int) -> None:
        self.emptied.append(index)

    def synchronize(self, index: int) -> None:
        pass

    def reset_peak(self, index: int) -> None:
        pass


def test_a_registered_backend_joins_snapshots_and_cleanup() -> None:
    backend = _ScriptedBackend()
    assert isinstance(backend, DeviceBackend)
    register_backend(backend)
    try:
        assert resolve_device("scripted") == Device("scripted", 0)
        assert Device("scripted", 1) in available_devices()
        with pytest.raises(DeviceUnavailableError, match=r"has 2 SCRIPTED devices"):
            resolve_device("scripted:2")
        snap = vramkit.snapshot()
        assert snap["scripted:1"].allocated_bytes == 1
        vramkit.cleanup(["scripted:0", "scripted:1"])
        assert backend.emptied == [0, 1]
    finally:
        unregister_backend("scripted")
    assert all(d.kind != "scripted" for d in available_devices())


class _CountedBackend(BackendBase):
    """Counts the questions that checking a device name asks."""

    kind = "counted"
    indexed = True

    def __init__(self, *, available: bool = True, preferred: bool = False) -> None:
        self.checks = 0
        self.available = available
        self.preferred = preferred

    def is_available(self) -> bool:
        self.checks += 1
        return self.available

    def device_count(self) -> int:
        self.checks += 1
        return 2

    def current_index(self) -> int:
        return 1

    def read(self, index: int) -> DeviceMemory:
        return DeviceMemory(device=f"counted:{index}", allocated_bytes=0, total_bytes=100)

    def empty_cache(self, index: int) -> None:
        pass

    def synchronize(self, index: int) -> None:
        pass

    def reset_peak(self, index: int) -> None:
        pass


@pytest.fixture
def counted() -> Iterator[_CountedBackend]:
    backend = _CountedBackend()
    register_backend(backend)
    try:
        yield backend
    finally:
        unregister_backend("counted")


def test_a_parsed_device_reads_itself_and_is_never_checked_again(
    counted: _CountedBackend,
) -> None:
    device = resolve_device("counted")
    assert device == Device("counted", 1)  # the backend's current device
    available_devices()  # the device list, read once per change of the registry
    checks = counted.checks
    assert resolve_device(device) is device
    assert device.read().device == "counted:1"
    vramkit.snapshot(device)
    vramkit.cleanup(device)
    with vramkit.gpu_session(device, leak_check=None):
        pass
    assert counted.checks == checks
    # A Device made by hand that names no device still gets the full check.
    with pytest.raises(DeviceUnavailableError, match="this machine has 2 COUNTED devices"):
        resolve_device(Device("counted", 5))


def test_a_preferred_backend_becomes_the_default_at_its_current_index() -> None:
    backend = _CountedBackend(preferred=True)
    backend.kind = "accel"  # sorts before every built-in accelerator
    register_backend(backend)
    try:
        assert default_device() == Device("accel", 1)
    finally:
        unregister_backend("accel")


@no_cuda
def test_a_device_that_is_not_preferred_never_becomes_the_default(
    counted: _CountedBackend,
) -> None:
    assert Device("counted", 0) in available_devices()
    assert default_device() == Device("cpu")


def test_an_unavailable_backend_says_why() -> None:
    backend = _CountedBackend(available=False)
    register_backend(backend)
    try:
        with pytest.raises(DeviceUnavailableError, match="the 'counted' backend reports no device"):
            resolve_device("counted")
        backend.why_unavailable = lambda: "the board is unplugged"  # type: ignore[method-assign]
        with pytest.raises(DeviceUnavailableError, match="the board is unplugged"):
            resolve_device("counted:0")
    finally:
        unregister_backend("counted")


def test_a_backend_that_does_not_derive_from_the_base_gets_its_defaults() -> None:
    backend = _ScriptedBackend()
    backend.why_unavailable = lambda: "its own reason"  # type: ignore[attr-defined]
    register_backend(backend)
    try:
        registered = get_backend("scripted")
        assert isinstance(registered, BackendBase)
        assert not registered.host and not registered.preferred
        assert registered.why_unavailable() == "its own reason"  # its own hook is kept
        assert registered.clean(1) == "empty_cache"  # the default: synchronize, empty the cache
        assert registered.emptied == [1]  # its other attributes pass through
        report = vramkit.cleanup("scripted:0")
        assert "empty_cache scripted:0" in report.steps
        assert backend.emptied == [1, 0]
    finally:
        unregister_backend("scripted")


def test_the_host_has_no_cleanup_step_of_its_own() -> None:
    assert Device("cpu").is_host
    assert Device("cpu").clean() is None
    steps = vramkit.cleanup("cpu").steps
    assert not any(step.startswith("empty_cache") for step in steps)


def test_device_memory_str_and_dict() -> None:
    reading = DeviceMemory(
        device="cuda:0",
        allocated_bytes=3 * 1024**3,
        reserved_bytes=4 * 1024**3,
        used_bytes=5 * 1024**3 + 200 * 1024**2,
        free_bytes=11 * 1024**3 - 200 * 1024**2,
        total_bytes=16 * 1024**3,
    )
    text = str(reading)
    assert text.startswith("cuda:0  5.2 / 16.0 GiB used (32%)")
    assert "allocated 3.0 GiB" in text and "reserved 4.0 GiB" in text
    assert reading.cache_bytes == 1024**3
    assert reading.to_dict()["process_used_bytes"] is None
