"""Keep-alive expiry survives any one bad entry: an infinite, huge or NaN delay."""

from __future__ import annotations

import datetime
import math
import threading
import time
from typing import Any

import pytest
import torch

from vramkit import ManagedModel, ModelPool, ModelState
from vramkit._keepalive import KeepAliveScheduler
from vramkit.errors import InvalidArgumentError
from vramkit.testing.models import TinyMLP


class Probe:
    """An expirable that records its expiry."""

    def __init__(self) -> None:
        self.expired = threading.Event()

    def _expire(self, stamp: int) -> None:
        self.expired.set()


def _settle(scheduler: KeepAliveScheduler) -> None:
    """Give the thread a moment to reach its wait (or to die, on the old code)."""
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        thread = scheduler.thread
        if thread is not None and not thread.is_alive():
            return
        time.sleep(0.01)


@pytest.mark.parametrize("delay", [math.inf, 1e300, 9.3e9, datetime.timedelta.max.total_seconds()])
def test_a_huge_delay_does_not_stop_the_others_expiring(delay: float) -> None:
    scheduler = KeepAliveScheduler("test-keepalive")
    forever, soon = Probe(), Probe()
    try:
        scheduler.schedule(forever, delay, 0)
        _settle(scheduler)
        scheduler.schedule(soon, 0.0, 0)
        assert soon.expired.wait(10), "the keep-alive thread stopped serving expiries"
        assert not forever.expired.is_set()
        assert scheduler.thread is not None and scheduler.thread.is_alive()
    finally:
        scheduler.close()


@pytest.mark.parametrize("delay", [math.nan, -1.0, "5", True])
def test_a_bad_delay_is_refused_in_the_caller(delay: Any) -> None:
    scheduler = KeepAliveScheduler("test-keepalive", start=False)
    with pytest.raises(InvalidArgumentError, match="keep_alive"):
        scheduler.schedule(Probe(), delay, 0)
    assert scheduler.pending() == 0


def test_a_failing_clock_does_not_kill_the_thread() -> None:
    calls = [0]

    def clock() -> float:
        calls[0] += 1
        if calls[0] == 3:  # once, in the thread
            raise RuntimeError("clock failed")
        return time.monotonic()

    scheduler = KeepAliveScheduler("test-keepalive", clock=clock)
    first, second = Probe(), Probe()
    try:
        scheduler.schedule(first, 0.05, 0)
        first.expired.wait(10)
        scheduler.schedule(second, 0.0, 0)
        assert second.expired.wait(10), "one failing clock reading stopped the thread"
    finally:
        scheduler.close()


@pytest.mark.parametrize("value", [math.inf, None])
def test_infinite_keep_alive_means_never(value: float | None) -> None:
    mm = ManagedModel(lambda: TinyMLP(16), device="cpu", keep_alive=value)
    assert mm.keep_alive is None
    pool = ModelPool("cpu", budget="1GiB", keep_alive=value)
    try:
        assert pool.register("m", lambda: TinyMLP(16)).keep_alive is None
    finally:
        pool.close()


def test_one_infinite_keep_alive_in_a_pool_leaves_expiry_working() -> None:
    with ModelPool("cpu", budget="1GiB", headroom=0) as pool:
        size = 4 * (16 * 16 + 16) * 4 + 16 * 4  # known: a first load of unknown size evicts
        forever = pool.register("forever", lambda: TinyMLP(16), keep_alive=1e300, size_hint=size)
        brief = pool.register("brief", lambda: TinyMLP(16), keep_alive=0.05, size_hint=size)
        with forever.use() as model:
            model(torch.ones(1, 16))
        time.sleep(0.2)  # the old thread died on the huge deadline here
        with brief.use() as model:
            model(torch.ones(1, 16))
        deadline = time.monotonic() + 60  # a bound against hanging, not a speed check
        while brief.state is not ModelState.UNLOADED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert brief.state is ModelState.UNLOADED
        assert forever.state is ModelState.READY
