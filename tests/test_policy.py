"""Cleanup cadence: the rules on a FakeDevice with a hand-driven clock; managed() for real."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from vramkit.errors import DeviceUnavailableError, InvalidArgumentError, VramLeakError
from vramkit.memory import MemorySnapshot
from vramkit.policy import CleanupPolicy, CleanupTracker, managed
from vramkit.session import gpu_session
from vramkit.testing.fake import FakeDevice

MIB = 1 << 20
GIB = 1 << 30


class Clock:
    """Seconds that move only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fake() -> Iterator[FakeDevice]:
    device = FakeDevice(total="8GiB")
    with device.install():
        yield device


@pytest.fixture
def clock() -> Clock:
    return Clock()


def run_calls(tracker: CleanupTracker, n: int) -> list[bool]:
    return [tracker.after_call() is not None for _ in range(n)]


# --------------------------------------------------------------------------- the rules


def test_every_calls(fake: FakeDevice, clock: Clock) -> None:
    tracker = CleanupPolicy(every_calls=3, above_fraction=None).tracker("fake:0", clock=clock)
    assert run_calls(tracker, 7) == [False, False, True, False, False, True, False]
    assert tracker.calls == 7
    assert tracker.cleanups == 2
    assert tracker.last_reason == "calls"
    assert fake.empty_cache_calls == 2
    assert fake.synchronize_calls == 2


def test_every_seconds(fake: FakeDevice, clock: Clock) -> None:
    tracker = CleanupPolicy(every_seconds=10, above_fraction=None).tracker("fake:0", clock=clock)
    cleaned = []
    for now in (1, 5, 9.9, 10, 15, 19.9, 20.5, 21):
        clock.now = now
        cleaned.append(tracker.after_call() is not None)
    assert cleaned == [False, False, False, True, False, False, True, False]
    assert tracker.last_reason == "seconds"
    assert fake.empty_cache_calls == 2


def test_above_fraction_reads_at_most_every_check_interval(fake: FakeDevice, clock: Clock) -> None:
    policy = CleanupPolicy(above_fraction=0.5, check_every_seconds=1.0)
    tracker = policy.tracker("fake:0", clock=clock)
    fake.allocate("2GiB")  # 25%
    assert tracker.after_call() is None  # the first call reads
    assert fake.read_calls == 1
    assert tracker.last_fraction == pytest.approx(0.25)
    fake.allocate("3GiB")  # 62.5%, but the next reading is not due yet
    clock.now = 0.5
    assert run_calls(tracker, 100) == [False] * 100
    assert fake.read_calls == 1  # a hundred calls, no device query
    clock.now = 1.0
    report = tracker.after_call()
    assert report is not None
    assert tracker.last_reason == "pressure"
    assert tracker.last_fraction == pytest.approx(0.625)
    assert report.before["fake:0"].used_bytes == 5 * GIB
    fake.free("4GiB")  # freed into the cache: the driver still counts it as used
    clock.now = 2.0
    report = tracker.after_call()
    assert report is not None
    assert report.freed_bytes("fake:0", "reserved") == 4 * GIB
    clock.now = 3.0
    assert tracker.after_call() is None  # 12.5% once the cache went back
    assert fake.empty_cache_calls == 2


def test_on_pressure_is_edge_triggered(fake: FakeDevice, clock: Clock) -> None:
    events: list[MemorySnapshot] = []
    policy = CleanupPolicy(
        above_fraction=None,
        on_pressure=events.append,
        pressure_fraction=0.75,
        check_every_seconds=0,
    )
    tracker = policy.tracker("fake:0", clock=clock)
    fake.allocate("7GiB")  # 87.5%: crosses upwards
    run_calls(tracker, 3)
    assert len(events) == 1
    assert events[0]["fake:0"].used_bytes == 7 * GIB
    fake.free("4GiB")
    fake.empty_cache(0)  # 37.5%: below, re-armed
    run_calls(tracker, 2)
    assert len(events) == 1
    fake.allocate("4GiB")  # 87.5% again: fires again
    run_calls(tracker, 3)
    assert len(events) == 2
    assert tracker.pressure_events == 2
    assert tracker.cleanups == 0  # a callback, not a cleanup rule
    assert fake.empty_cache_calls == 1  # only the test's own


def test_a_failing_pressure_callback_still_lets_the_cleanup_run(
    fake: FakeDevice, clock: Clock
) -> None:
    def evict(snapshot: MemorySnapshot) -> None:
        raise RuntimeError("eviction failed")

    policy = CleanupPolicy(above_fraction=0.5, on_pressure=evict, pressure_fraction=0.5)
    tracker = policy.tracker("fake:0", clock=clock)
    fake.allocate("6GiB")
    with pytest.raises(RuntimeError, match="eviction failed"):
        tracker.after_call()
    assert fake.empty_cache_calls == 1
    assert tracker.cleanups == 1


def test_presets(fake: FakeDevice, clock: Clock) -> None:
    never = CleanupPolicy.never().tracker("fake:0", clock=clock)
    fake.allocate("7900MiB")
    assert run_calls(never, 50) == [False] * 50
    assert fake.read_calls == 0  # no rule reads the device

    per_call = CleanupPolicy.per_call().tracker("fake:0", clock=clock)
    assert run_calls(per_call, 3) == [True, True, True]

    default = CleanupPolicy.default()
    assert default.above_fraction == 0.9
    assert default.every_calls is None
    assert default.every_seconds is None
    assert default.tracker("fake:0", clock=clock).after_call() is not None  # 96% used


def test_counts_are_exact_under_threads(fake: FakeDevice) -> None:
    tracker = CleanupPolicy(every_calls=50, above_fraction=None).tracker("fake:0")
    barrier = threading.Barrier(4)
    cleaned: list[int] = []

    def worker() -> None:
        barrier.wait()
        cleaned.append(sum(run_calls(tracker, 100)))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert tracker.calls == 400
    assert tracker.cleanups == 8
    assert sum(cleaned) == 8
    assert fake.empty_cache_calls == 8


# --------------------------------------------------------------------------- managed


def test_managed_applies_the_policy_per_call(fake: FakeDevice) -> None:
    @managed("fake:0", cleanup=CleanupPolicy(every_calls=2, above_fraction=None))
    def predict(x: int) -> int:
        fake.allocate("64MiB")
        fake.free("64MiB")
        return x * 2

    assert [predict(i) for i in range(5)] == [0, 2, 4, 6, 8]
    assert predict.tracker.calls == 5
    assert predict.tracker.cleanups == 2
    assert fake.empty_cache_calls == 2
    assert fake.read(0).reserved_bytes == 64 * MIB  # the fifth call's cache is still there


def test_managed_bare_cleans_after_every_call_on_the_default_device() -> None:
    @managed
    def predict(n: int) -> float:
        return float(torch.ones(n).sum())

    assert predict(3) == 3.0
    assert predict(4) == 4.0
    assert predict.tracker.cleanups == 2
    assert predict.__name__ == "predict"


def test_managed_counts_failed_calls_and_lets_their_errors_through(fake: FakeDevice) -> None:
    @managed("fake:0", cleanup=CleanupPolicy(every_calls=2, above_fraction=None))
    def predict(x: int) -> int:
        if x < 0:
            raise ValueError("negative")
        return x

    with pytest.raises(ValueError, match="negative"):
        predict(-1)
    assert predict(1) == 1
    assert predict.tracker.calls == 2
    assert fake.empty_cache_calls == 1


def test_managed_retries_after_a_real_oom() -> None:
    attempts: list[int] = []

    @managed("cpu", cleanup=None, oom_retries=1)
    def predict(n: int) -> int:
        attempts.append(n)
        size = 1 << 60 if len(attempts) == 1 else n
        return torch.empty(size, dtype=torch.uint8).numel()

    assert predict(8) == 8
    assert attempts == [8, 8]
    assert predict.tracker.calls == 1
    assert predict.tracker.cleanups == 0


def test_managed_async(fake: FakeDevice) -> None:
    @managed("fake:0", cleanup=CleanupPolicy(every_calls=1, above_fraction=None))
    async def predict(x: int) -> int:
        await asyncio.sleep(0)
        return x + 1

    async def main() -> list[int]:
        return list(await asyncio.gather(predict(1), predict(2), predict(3)))

    assert asyncio.run(main()) == [2, 3, 4]
    assert predict.tracker.cleanups == 3


_KEPT: list[torch.Tensor] = []


def test_managed_with_a_session_checks_each_call() -> None:
    @managed("cpu", cleanup=None, session=gpu_session("cpu", retries=0))
    def predict(keep: bool) -> int:
        scratch = torch.empty(32 * MIB, dtype=torch.uint8)
        if keep:
            _KEPT.append(scratch)
        return scratch.numel()

    try:
        assert predict(False) == 32 * MIB
        with pytest.raises(VramLeakError, match=r"\.predict: leaked 32\.0 MiB on cpu"):
            predict(True)
        assert predict.tracker.calls == 2  # the tracker ran inside the session
    finally:
        _KEPT.clear()


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"every_calls": 0}, "every_calls"),
        ({"every_calls": True}, "every_calls"),
        ({"every_calls": 2.5}, "every_calls"),
        ({"every_seconds": 0}, "every_seconds"),
        ({"every_seconds": -1.0}, "every_seconds"),
        ({"every_seconds": float("inf")}, "every_seconds"),
        ({"every_seconds": "10s"}, "every_seconds"),
        ({"above_fraction": 0}, "above_fraction"),
        ({"above_fraction": 1.5}, "above_fraction"),
        ({"above_fraction": float("nan")}, "above_fraction"),
        ({"above_fraction": "90%"}, "above_fraction"),
        ({"check_every_seconds": -1}, "check_every_seconds"),
        ({"check_every_seconds": None}, "check_every_seconds"),
        ({"on_pressure": "evict"}, "on_pressure"),
        ({"pressure_fraction": 0}, "pressure_fraction"),
        ({"pressure_fraction": 2}, "pressure_fraction"),
    ],
)
def test_bad_policy(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        CleanupPolicy(**kwargs)


def test_policy_is_frozen_and_replaceable() -> None:
    policy = CleanupPolicy.default()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.every_calls = 3  # type: ignore[misc]
    assert dataclasses.replace(policy, every_calls=3).every_calls == 3
    with pytest.raises(InvalidArgumentError, match="every_calls"):
        dataclasses.replace(policy, every_calls=-3)


def test_bad_tracker() -> None:
    with pytest.raises(InvalidArgumentError, match="clock"):
        CleanupPolicy().tracker("cpu", clock=5.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="device"):
        CleanupPolicy().tracker("nonsense!")
    with pytest.raises(InvalidArgumentError, match="policy"):
        CleanupTracker("often", "cpu")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"cleanup": "often"}, InvalidArgumentError, "cleanup"),
        ({"oom_retries": -1}, InvalidArgumentError, "oom_retries"),
        ({"oom_retries": True}, InvalidArgumentError, "oom_retries"),
        ({"session": "strict"}, InvalidArgumentError, "session"),
        ({"device": "nonsense!"}, InvalidArgumentError, "device"),
        ({"device": "cuda:7"}, DeviceUnavailableError, "cuda:7"),
    ],
)
def test_bad_managed(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    if kwargs.get("device") == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(error, match=match):
        managed(**kwargs)
    with pytest.raises(InvalidArgumentError, match="decorates a function"):
        managed("cpu")(3)  # type: ignore[arg-type]
