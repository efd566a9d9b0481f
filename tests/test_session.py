"""gpu_session: real CPU tensors for the host path, FakeDevice for the accelerator rules."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import copy
import gc
import inspect
import json
import re
import sys
import threading
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
import torch

from vramkit.devices import default_device
from vramkit.errors import (
    DeviceUnavailableError,
    InvalidArgumentError,
    ModelStateError,
    VramLeakError,
)
from vramkit.session import GpuSession, SessionReport, VramLeakWarning, gpu_session
from vramkit.testing.fake import FakeDevice

from .helpers import scale

MIB = 1 << 20

# Where the planted leaks live: a module global, as a careless cache would be.
_PLANTED: list[torch.Tensor] = []


@pytest.fixture(autouse=True)
def _unplant() -> Iterator[None]:
    yield
    _PLANTED.clear()


def plant(nbytes: int) -> torch.Tensor:
    tensor = torch.empty(nbytes, dtype=torch.uint8)
    _PLANTED.append(tensor)
    return tensor


@contextlib.contextmanager
def heap_work() -> Iterator[collections.Counter[str]]:
    """Count, in this thread, the calls that make a session slow: heap walks and collections.

    A census of live tensors walks the heap with ``gc.get_referrers``; a cleanup
    runs ``gc.collect``. Counted at the interpreter's boundary (``sys.setprofile``),
    not by replacing vramkit's functions, so the count holds whatever calls them.
    """
    counts: collections.Counter[str] = collections.Counter()
    watched = {gc.get_referrers: "heap walk", gc.collect: "collection", gc.unfreeze: "thaw"}

    def profile(frame: object, event: str, arg: object) -> None:
        if event == "c_call" and arg in watched:
            counts[watched[arg]] += 1  # type: ignore[index]

    sys.setprofile(profile)
    try:
        yield counts
    finally:
        sys.setprofile(None)


# --------------------------------------------------------------------------- host (CPU) leaks


def test_planted_leak_raises_naming_the_tensor_and_its_holder() -> None:
    with pytest.raises(VramLeakError) as info, gpu_session("cpu") as s:
        plant(32 * MIB)
    message = str(info.value)
    assert isinstance(info.value, AssertionError)
    assert message.startswith("leaked 32.0 MiB on cpu (live tensors +32.0 MiB, process ")
    assert "Tensor[33554432] uint8 on cpu, 32.0 MiB" in message
    assert re.search(r"held by (tests\.)?test_session\._PLANTED\[0\]$", message)
    report = s.report
    assert report.verdict == "leak"
    assert report.leaked_bytes == 32 * MIB
    assert report.allocator_growth_bytes == 32 * MIB
    assert report.new_tensors is not None
    assert [t.nbytes for t in report.new_tensors] == [32 * MIB]
    assert report.new_tensors[0].tensor is _PLANTED[0]
    # read after the young collection, re-checked after a full one, then `retries` times
    assert report.checks == 1 + 1 + 3
    assert report.cleanup is not None
    assert report.raised is None


def test_clean_block_passes() -> None:
    with gpu_session("cpu") as s:
        scratch = torch.ones(64 * MIB, dtype=torch.uint8)  # touched: real pages
        total = int(scratch[:10].sum())
        del scratch
    assert total == 10
    report = s.report
    assert report.verdict == "clean"
    assert report.leaked_bytes == 0
    assert report.allocator_growth_bytes == 0
    assert report.new_tensors is not None
    assert len(report.new_tensors) == 0
    assert report.checks == 1
    assert report.held == ()
    assert report.peak_bytes is not None
    assert report.peak_bytes >= report.before["cpu"].process_used_bytes  # type: ignore[operator]


def test_tolerance_is_respected() -> None:
    with gpu_session("cpu", tolerance="4MiB") as s:
        plant(1 * MIB)
    assert s.report.verdict == "clean"
    assert s.report.leaked_bytes == 1 * MIB  # reported, but within tolerance
    assert s.report.tolerance_bytes == 4 * MIB
    with (
        pytest.raises(VramLeakError, match=r"leaked 1\.0 MiB on cpu"),
        gpu_session("cpu", tolerance="512KiB", retries=0),
    ):
        plant(1 * MIB)


def test_warn_warns_instead_of_raising() -> None:
    with (
        pytest.warns(VramLeakWarning, match=r"leaked 32\.0 MiB on cpu") as record,
        gpu_session("cpu", leak_check="warn", retries=0) as s,
    ):
        plant(32 * MIB)
    assert issubclass(VramLeakWarning, ResourceWarning)
    assert "_PLANTED[0]" in str(record[0].message)
    assert s.report.verdict == "leak"


def test_none_only_reports() -> None:
    with heap_work() as work, gpu_session("cpu", leak_check=None, cleanup=False) as s:
        plant(32 * MIB)
    assert work == {}  # no census, no collection: numbers only
    report = s.report
    assert report.verdict == "unchecked"
    assert report.leaked_bytes is None
    assert report.new_tensors is None
    assert report.cleanup is None
    assert report.checks == 0
    assert "cpu" in report.delta
    assert report.after is not report.before
    assert len(_PLANTED) == 1  # the session touched nothing


def test_a_leak_freed_by_the_garbage_collector_is_not_a_leak() -> None:
    # A tensor held only by a reference cycle is alive when the block ends and
    # dies at the next collection: the re-check after gc must clear it.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with gpu_session("cpu", cleanup=False) as s:
            cycle: list[Any] = [torch.empty(32 * MIB, dtype=torch.uint8)]
            cycle.append(cycle)
            del cycle
    finally:
        if was_enabled:
            gc.enable()
    assert s.report.verdict == "clean"
    assert s.report.checks == 2  # first reading saw 32 MiB; after gc it was gone
    assert s.report.cleanup is not None


def test_a_freed_address_reused_by_a_new_tensor_still_counts() -> None:
    old = torch.empty(32 * MIB, dtype=torch.uint8)
    old_ptr = old.data_ptr()
    with pytest.raises(VramLeakError), gpu_session("cpu", retries=0):  # noqa: PT012
        del old
        # the allocator (glibc mmap) tends to hand the same address back
        new = plant(32 * MIB)
        reused = new.data_ptr() == old_ptr
    if not reused:
        pytest.skip("the allocator did not reuse the address this time")


def test_the_blocks_exception_propagates_unchanged_with_the_report_filled() -> None:
    error = ValueError("bad audio")
    with pytest.raises(ValueError, match="bad audio") as info, gpu_session("cpu") as s:  # noqa: PT012
        plant(32 * MIB)
        raise error
    assert info.value is error
    assert not isinstance(info.value, VramLeakError)
    report = s.report
    assert report.raised == "ValueError: bad audio"
    assert report.verdict == "leak"  # measured, but never raised over the block's error
    assert report.held == ()
    assert report.checks == 1  # no re-checks: the caller's exception is not kept waiting


def test_report_is_readable_and_serialisable() -> None:
    with gpu_session("cpu", name="batch 7", tolerance="1MiB", leak_check="warn") as s:
        pass
    report = s.report
    assert str(report).startswith("batch 7: clean on cpu (live tensors 0 B, process ")
    data = json.loads(json.dumps(report.to_dict()))
    assert data["verdict"] == "clean"
    assert data["name"] == "batch 7"
    assert data["tolerance_bytes"] == MIB
    assert data["cleanup"]["steps"][0] == "gc young (1)"  # nothing suspected: no full gc


def test_report_is_only_there_after_the_block() -> None:
    with gpu_session("cpu", leak_check=None) as s:
        assert not s.done
        with pytest.raises(ModelStateError, match="after the block"):
            _ = s.report
    assert s.done
    assert isinstance(s.report, SessionReport)


def test_exit_without_enter_is_refused() -> None:
    with pytest.raises(ModelStateError, match="without being entered"):
        gpu_session("cpu").__exit__(None, None, None)


# --------------------------------------------------------------------------- decorator


@gpu_session
def _bare_leaky() -> int:
    plant(32 * MIB)
    return 1


@gpu_session
def _bare_clean(n: int) -> int:
    return int(torch.ones(n).sum())


def test_bare_decorator() -> None:
    assert isinstance(_bare_clean.session, GpuSession)
    assert _bare_clean.session.device == default_device()
    assert _bare_clean(5) == 5
    report = _bare_clean.session.last_report
    assert report is not None
    assert report.verdict == "clean"
    assert report.name == "_bare_clean"
    assert _bare_clean.__name__ == "_bare_clean"
    with pytest.raises(VramLeakError, match=r"^_bare_leaky: leaked 32\.0 MiB on cpu"):
        _bare_leaky()
    # a function passed positionally with settings: the settings are kept
    quiet = gpu_session(_bare_leaky.__wrapped__, leak_check=None)  # type: ignore[attr-defined]
    assert quiet.session.leak_check is None
    assert quiet() == 1


def test_decorator_with_arguments() -> None:
    session = gpu_session("cpu", leak_check="warn", tolerance="1MiB", name="embed")

    @session
    def embed(n: int) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.uint8)

    kept = embed(100)
    assert session.last_report is not None
    assert session.last_report.verdict == "clean"  # 100 bytes: within tolerance
    with pytest.warns(VramLeakWarning, match=r"^embed: leaked 2\.0 MiB"):
        kept = embed(2 * MIB)
    assert kept.numel() == 2 * MIB
    assert embed.session is session


def test_async_decorator_and_async_with() -> None:
    @gpu_session("cpu", retries=0)
    async def transcribe(n: int) -> int:
        await asyncio.sleep(0)
        scratch = torch.ones(n)
        await asyncio.sleep(0)
        return int(scratch.sum())

    @gpu_session("cpu", retries=0)
    async def leaky() -> None:
        await asyncio.sleep(0)
        plant(32 * MIB)

    assert inspect.iscoroutinefunction(transcribe)
    assert asyncio.run(transcribe(7)) == 7
    assert transcribe.session.last_report is not None
    assert transcribe.session.last_report.verdict == "clean"
    with pytest.raises(VramLeakError, match=r"leaky: leaked 32\.0 MiB"):
        asyncio.run(leaky())

    async def with_block() -> SessionReport:
        async with gpu_session("cpu", leak_check=None) as s:
            await asyncio.sleep(0.01)
        return s.report

    assert asyncio.run(with_block()).seconds >= 0.01


def test_concurrent_tasks_get_their_own_entries() -> None:
    session = gpu_session("cpu", leak_check=None, cleanup=False)

    async def task(delay: float) -> tuple[float, SessionReport]:
        with session as s:
            await asyncio.sleep(delay)
        return delay, s.report

    async def main() -> list[tuple[float, SessionReport]]:
        return await asyncio.gather(task(0.05), task(0.01), task(0.03))

    results = asyncio.run(main())
    reports = [r for _, r in results]
    assert len({id(r) for r in reports}) == 3
    for delay, report in results:
        assert delay <= report.seconds < delay + 0.04


def test_one_session_shared_by_threads_and_nested_gives_independent_reports() -> None:
    session = gpu_session("cpu", leak_check=None, cleanup=False)
    delays = [0.08, 0.02, 0.05, 0.0]
    barrier = threading.Barrier(len(delays))
    results: dict[float, SessionReport] = {}
    errors: list[BaseException] = []

    def worker(delay: float) -> None:
        try:
            barrier.wait()
            with session as s:
                time.sleep(delay)
            results[delay] = s.report
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(d,)) for d in delays]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len({id(r) for r in results.values()}) == len(delays)
    for delay, report in results.items():
        assert delay <= report.seconds < delay + 0.05

    with session as outer:
        time.sleep(0.02)
        with session as inner:
            pass
    assert inner.report is not outer.report
    assert inner.report.seconds < 0.02 <= outer.report.seconds
    assert session.last_report is outer.report


# --------------------------------------------------------------------------- accelerator rules


@pytest.fixture
def fake() -> Iterator[FakeDevice]:
    device = FakeDevice(total="8GiB")
    with device.install():
        yield device


def test_accelerator_leak_needs_the_driver_to_confirm(fake: FakeDevice) -> None:
    with pytest.raises(VramLeakError) as info, gpu_session("fake:0", retries=0) as s:
        fake.allocate("64MiB")
    assert str(info.value).startswith(
        "leaked 64.0 MiB on fake:0 (allocated +64.0 MiB, reserved +64.0 MiB, process +64.0 MiB"
    )
    assert s.report.verdict == "leak"
    assert s.report.driver_growth_bytes == 64 * MIB


def test_allocator_growth_the_driver_does_not_see_is_unverified(fake: FakeDevice) -> None:
    fake.set_outside("100MiB")
    with (  # noqa: PT031 - the block is what is measured
        pytest.warns(VramLeakWarning, match="driver does not confirm"),
        gpu_session("fake:0", leak_check="raise", retries=0) as s,  # warns, never raises
    ):
        fake.allocate("64MiB")
        fake.set_outside("36MiB")  # something else let go of the same amount
    assert s.report.verdict == "unverified"
    assert s.report.leaked_bytes == 64 * MIB
    assert s.report.driver_growth_bytes == 0


def test_driver_only_growth_is_ignored_unless_process_tolerance_is_set(
    fake: FakeDevice,
) -> None:
    with gpu_session("fake:0") as s:
        fake.set_outside("64MiB")  # a context or an arena grew
    assert s.report.verdict == "clean"
    assert s.report.driver_growth_bytes == 64 * MIB
    fake.set_outside(0)
    with (
        pytest.raises(VramLeakError, match=r"leaked 64\.0 MiB on fake:0"),
        gpu_session("fake:0", process_tolerance="16MiB", retries=0),
    ):
        fake.set_outside("64MiB")


def test_accelerator_cache_is_emptied_before_and_after(fake: FakeDevice) -> None:
    fake.allocate("256MiB")
    fake.free("256MiB")  # 256 MiB cached: would hide a leak from the driver
    with gpu_session("fake:0") as s:
        assert fake.empty_cache_calls == 1  # before: the driver baseline holds no cache
        fake.allocate("8MiB")
        fake.free("8MiB")
    assert fake.empty_cache_calls == 2
    assert s.report.verdict == "clean"
    assert s.report.before["fake:0"].reserved_bytes == 0


class _WarmedFake(FakeDevice):
    """A fake whose backend hooks record when a session calls them."""

    def __init__(self) -> None:
        super().__init__("warmed", total="1GiB")
        self.calls: list[str] = []

    def warm_up(self, index: int) -> None:
        self.calls.append("warm_up")

    def release_workspaces(self, index: int) -> None:
        self.calls.append("release_workspaces")

    def empty_cache(self, index: int = 0) -> None:
        self.calls.append("empty_cache")
        super().empty_cache(index)


def test_a_leak_check_warms_the_device_and_frees_workspaces_through_its_backend() -> None:
    # CUDA's context creation and cuBLAS workspaces are the cuda backend's
    # hooks; a session calls them on whatever device it checks.
    device = _WarmedFake()
    with device.install(), gpu_session("warmed:0") as s:
        assert device.calls == ["warm_up", "release_workspaces", "empty_cache"]
        device.calls.clear()
    assert device.calls == ["release_workspaces", "empty_cache"]
    assert s.report.verdict == "clean"
    with device.install(), gpu_session("warmed:0", leak_check=None, cleanup=False):
        pass
    assert device.calls == ["release_workspaces", "empty_cache"]  # nothing more unchecked


def test_peak_is_the_blocks_and_survives_a_nested_reset(fake: FakeDevice) -> None:
    fake.allocate("1GiB")
    fake.free("1GiB")
    session = gpu_session("fake:0", leak_check=None, cleanup=False)
    with session as outer:
        fake.allocate("512MiB")
        fake.free("512MiB")
        with session as inner:  # resets the device's peak counter
            fake.allocate("128MiB")
            fake.free("128MiB")
    assert inner.report.peak_bytes == 128 * MIB
    assert outer.report.peak_bytes == 512 * MIB  # not the 1 GiB from before, not 128 MiB
    assert fake.reset_peak_calls == 2


@pytest.mark.cuda
def test_cuda_leak_is_confirmed_by_the_driver() -> None:
    with (
        pytest.raises(
            VramLeakError, match=r"^leaked 32\.0 MiB on cuda:0 \(allocated \+32\.0 MiB, \w+ \+"
        ),
        gpu_session("cuda:0") as s,
    ):
        _PLANTED.append(torch.empty(32 * MIB, dtype=torch.uint8, device="cuda:0"))
    assert s.report.verdict == "leak"
    assert s.report.new_tensors is not None
    assert s.report.new_tensors[0].device == "cuda:0"


@pytest.mark.cuda
def test_cuda_clean_block_and_context_creation_do_not_count() -> None:
    with gpu_session("cuda:0") as s:
        scratch = torch.ones(16 * MIB, device="cuda:0")
        scratch.mul_(2)
        del scratch
    assert s.report.verdict == "clean"
    assert s.report.peak_bytes is not None
    assert s.report.peak_bytes >= 64 * MIB
    assert s.report.allocator_growth_bytes == 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"leak_check": "maybe"}, InvalidArgumentError, "leak_check"),
        ({"leak_check": True}, InvalidArgumentError, "leak_check"),
        ({"tolerance": "ten"}, InvalidArgumentError, "tolerance"),
        ({"tolerance": -1}, InvalidArgumentError, "tolerance"),
        ({"tolerance": "10G"}, InvalidArgumentError, "ambiguous"),
        ({"process_tolerance": "lots"}, InvalidArgumentError, "process_tolerance"),
        ({"cleanup": "yes"}, InvalidArgumentError, "cleanup"),
        ({"retries": -1}, InvalidArgumentError, "retries"),
        ({"retries": True}, InvalidArgumentError, "retries"),
        ({"retries": 1.5}, InvalidArgumentError, "retries"),
        ({"name": 3}, InvalidArgumentError, "name"),
        ({"device": "nonsense!"}, InvalidArgumentError, "device"),
        ({"device": 2.5}, InvalidArgumentError, "device"),
        ({"device": "cuda:7"}, DeviceUnavailableError, "cuda:7"),
    ],
)
def test_bad_input(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(error, match=match):
        gpu_session(**kwargs)


def test_decorating_something_that_is_not_a_function() -> None:
    with pytest.raises(InvalidArgumentError, match="decorates a function"):
        gpu_session("cpu")(42)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="decorates a function"):
        gpu_session("cpu")(int)


# --------------------------------------------------------------------------- cost


def test_entering_and_leaving_without_leak_check_is_cheap() -> None:
    # What costs milliseconds is walking the heap or collecting it; without a leak
    # check a session does neither, however often it is entered. (The time itself
    # is measured by benchmarks/bench_session.py, not asserted on a busy machine.)
    session = gpu_session("cpu", leak_check=None, cleanup=False)
    with heap_work() as work:
        for _ in range(50):
            with session:
                pass
    assert work == {}
    with heap_work() as work, gpu_session("cpu", leak_check="raise"):
        pass
    assert work["heap walk"] >= 2  # a leak check does both: the counter sees them
    assert work["collection"] >= 1


def _collections_during(block: Any) -> list[int]:
    """The generations of the collections run while ``block()`` runs, none of them automatic."""
    seen: list[int] = []

    def record(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    was_enabled = gc.isenabled()
    gc.disable()
    gc.callbacks.append(record)
    try:
        block()
    finally:
        gc.callbacks.remove(record)
        if was_enabled:
            gc.enable()
    return seen


def test_a_session_without_a_leak_check_runs_no_full_collection() -> None:
    # A full collection walks the whole heap (0.2 s with FunASR loaded): a
    # session around every batch must not pay it.
    def block() -> None:
        with gpu_session("cpu", leak_check=None) as s:
            cycle: list[Any] = [torch.empty(MIB, dtype=torch.uint8)]
            cycle.append(cycle)
            del cycle
        assert s.report.cleanup is not None
        assert s.report.cleanup.collected >= 1  # the young collection freed the cycle

    assert _collections_during(block) == [1]


def test_a_clean_leak_checked_block_runs_no_full_collection() -> None:
    def block() -> None:
        with gpu_session("cpu", tolerance="1MiB") as s:
            scratch = torch.ones(4 * MIB, dtype=torch.uint8)
            del scratch
        assert s.report.verdict == "clean"
        assert s.report.checks == 1

    assert 2 not in _collections_during(block)


def test_a_cycle_that_reached_the_oldest_generation_is_rechecked_not_reported() -> None:
    # The young collection leaves such a cycle alive: its tensor is still
    # there at the first reading, and only the full re-check may clear it.
    from torch.multiprocessing.reductions import StorageWeakRef

    refs: list[Any] = []

    def block() -> None:
        with gpu_session("cpu", tolerance="1MiB") as s:
            cycle: list[Any] = [torch.empty(32 * MIB, dtype=torch.uint8)]
            cycle.append(cycle)
            refs.append(StorageWeakRef(cycle[0].untyped_storage()))
            gc.collect(1)  # survivors of generation 1 move to the oldest
            del cycle
        assert s.report.verdict == "clean"
        assert s.report.checks == 2  # the young cleanup's reading saw 32 MiB

    seen = _collections_during(block)
    assert seen[:2] == [1, 1] and 2 in seen  # the block's, the session's, then a full one
    assert refs[0].expired()


def test_a_leak_held_through_a_cycle_is_still_caught_and_named() -> None:
    # Collecting less must not let a live cycle pass: reachable from a module
    # global, it survives every collection and is a leak.
    def block() -> None:
        with gpu_session("cpu", tolerance="1MiB", retries=0):
            node: dict[str, Any] = {"payload": torch.empty(32 * MIB, dtype=torch.uint8)}
            node["self"] = node
            _PLANTED.append(node["payload"])
            _CYCLES.append(node)

    try:
        with pytest.raises(VramLeakError, match=r"leaked 32\.0 MiB on cpu") as info:
            _collections_during(block)
    finally:
        _CYCLES.clear()
    assert re.search(r"held by (tests\.)?test_session\._(PLANTED\[0\]|CYCLES)", str(info.value))


_CYCLES: list[Any] = []


@pytest.mark.cuda
def test_cuda_a_dead_cycle_in_the_oldest_generation_does_not_offset_a_leak() -> None:
    # On an accelerator the allocator's net growth decides: a dead cycle of
    # 32 MiB left uncollected before the block and freed by the re-check
    # would hide a 32 MiB leak, which is why the session starts from a full
    # collection there.
    def block() -> None:
        cycle: list[Any] = [torch.empty(32 * MIB, dtype=torch.uint8, device="cuda:0")]
        cycle.append(cycle)
        gc.collect(1)
        del cycle
        with gpu_session("cuda:0", tolerance="1MiB", retries=0):
            _PLANTED.append(torch.empty(32 * MIB, dtype=torch.uint8, device="cuda:0"))

    with pytest.raises(VramLeakError, match=r"^leaked 32\.0 MiB on cuda:0"):
        _collections_during(block)


def test_a_clean_leak_checked_block_walks_the_heap_once_per_check() -> None:
    with heap_work() as work, gpu_session("cpu", tolerance="1MiB") as s:
        del s
    assert work["heap walk"] == 2  # the baseline's census, and the check's


# --------------------------------------------------------------------------- frozen heap


@pytest.fixture
def frozen() -> Iterator[None]:
    """The heap frozen by ``vramkit.freeze_heap`` (as after a server's startup), thawed after."""
    from vramkit import freeze_heap

    freeze_heap()
    try:
        yield
    finally:
        gc.unfreeze()


def test_a_frozen_heap_is_never_thawed_by_a_clean_check(frozen: None) -> None:
    with heap_work() as work, gpu_session("cpu", tolerance="1MiB") as s:
        scratch = torch.ones(4 * MIB, dtype=torch.uint8)
        del scratch
    assert s.report.verdict == "clean"
    assert work["thaw"] == 0 and work["heap walk"] == 2


def test_a_leak_into_a_frozen_global_is_caught_and_named(frozen: None) -> None:
    # _PLANTED was frozen with the heap: the holder search still sees it.
    with pytest.raises(VramLeakError) as info, gpu_session("cpu", retries=0):
        plant(32 * MIB)
    assert re.search(r"held by (tests\.)?test_session\._PLANTED\[0\]$", str(info.value))


def _keep_a_cycle() -> None:
    node: dict[str, Any] = {"payload": torch.empty(32 * MIB, dtype=torch.uint8)}
    node["self"] = node
    _CYCLES.append(node)


def test_a_leak_through_a_live_cycle_on_a_frozen_heap_is_caught(frozen: None) -> None:
    leaked = r"leaked 32\.0 MiB on cpu"
    try:
        with pytest.raises(VramLeakError, match=leaked) as info, gpu_session("cpu", retries=0):
            _keep_a_cycle()
    finally:
        _CYCLES.clear()
    assert re.search(r"held by (tests\.)?test_session\._CYCLES\[0\]\['payload'\]", str(info.value))


def test_a_dead_cycle_on_a_frozen_heap_is_not_a_leak(frozen: None) -> None:
    gc.disable()  # only the check's own collection may free the cycle
    try:
        with gpu_session("cpu", tolerance="1MiB") as s:
            node: dict[str, Any] = {"payload": torch.empty(32 * MIB, dtype=torch.uint8)}
            node["self"] = node
            del node
    finally:
        gc.enable()
    assert s.report.verdict == "clean"


def test_a_leak_frozen_by_the_block_itself_is_caught(frozen: None) -> None:
    # A freeze inside the block (a replica starting) moves the leak into the
    # frozen generation, where a census of what is new since the first freeze
    # would not look.
    def leak_and_freeze() -> None:
        plant(32 * MIB)
        gc.freeze()

    with pytest.raises(VramLeakError, match=r"leaked 32\.0 MiB on cpu"), gpu_session("cpu"):
        leak_and_freeze()


def test_a_frozen_parameter_given_a_new_storage_counts(frozen: None) -> None:
    # A frozen model converted or moved in the block keeps its Parameter
    # objects: the new storage they hold is new memory.
    weight = _FROZEN_MODEL.weight
    old = weight.data
    try:
        with pytest.raises(VramLeakError, match=r"leaked 32\.0 MiB on cpu"), gpu_session("cpu"):
            weight.data = torch.zeros(8 * MIB)
    finally:
        weight.data = old


_FROZEN_MODEL = torch.nn.Linear(4, 4)  # made at import: frozen with the heap


# --------------------------------------------------------------------------- FunASR


@pytest.fixture(scope="module")
def pipeline(funasr_module: ModuleType, funasr_pipeline: Any) -> Iterator[Any]:
    threads = torch.get_num_threads()
    model = funasr_module.AutoModel(
        **funasr_pipeline.automodel_kwargs(),
        device="cpu",
        disable_update=True,
        disable_pbar=True,
        ncpu=1,
    )
    yield model
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_no_false_positives_over_many_funasr_calls(pipeline: Any) -> None:
    from vramkit.testing.models import synthetic_audio

    calls = scale(50, 200)  # each leak check walks a 435k-object heap twice
    audio = synthetic_audio(1.0)
    pipeline.generate(audio, batch_size_s=60)  # the first call swaps in cached kwargs
    session = gpu_session("cpu", cleanup=False)
    verdicts: dict[str, int] = {}
    for _ in range(calls):
        with session as s:
            result = pipeline.generate(audio, batch_size_s=60)
        assert result[0]["text"]
        verdicts[s.report.verdict] = verdicts.get(s.report.verdict, 0) + 1
    assert verdicts == {"clean": calls}


def test_a_leak_around_funasr_is_still_caught(pipeline: Any) -> None:
    from vramkit.testing.models import module_nbytes, synthetic_audio

    audio = synthetic_audio(1.0)
    copies: list[Any] = []
    with (  # noqa: PT012 - the block is what is measured
        pytest.raises(VramLeakError) as info,
        gpu_session("cpu", tolerance=0, cleanup=False, retries=0) as s,
    ):
        pipeline.generate(audio, batch_size_s=60)
        copies.append(copy.deepcopy(pipeline.model))  # a careless per-request cache
    weights = module_nbytes(pipeline.model)
    assert weights > 0
    assert s.report.leaked_bytes is not None
    assert s.report.leaked_bytes >= weights
    message = str(info.value)
    assert "Parameter[" in message
    assert "local copies[0]" in message
