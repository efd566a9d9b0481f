"""Waits with strange bounds: NaN is refused at the call, infinity and 1e308 mean "no limit".

A NaN timeout once waited forever (every comparison with it is false) and an
infinite or huge one raised a raw ``OverflowError`` from the lock; ``unload()``
without ``wait`` blocked for the whole of another thread's load.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

from vramkit import ManagedModel, ModelPool, ModelState
from vramkit.errors import InvalidArgumentError, ModelBusyError
from vramkit.testing.models import TinyMLP

from .conftest import Record


def tiny() -> torch.nn.Module:
    return TinyMLP(16)


def finishes(call: Callable[[], Any], *, within: float = 10.0) -> tuple[bool, Any]:
    """Run ``call`` on a watchdog thread: (finished, its result or exception)."""
    box: list[Any] = []

    def target() -> None:
        try:
            box.append(call())
        except BaseException as exc:
            box.append(exc)

    thread = threading.Thread(target=target, daemon=True, name="watchdog-call")
    thread.start()
    thread.join(within)
    return (not thread.is_alive(), box[0] if box else None)


@contextmanager
def leased_elsewhere(mm: ManagedModel[Any]) -> Iterator[threading.Event]:
    """A lease held by another thread until the yielded event is set (or the block ends)."""
    taken, release = threading.Event(), threading.Event()

    def hold() -> None:
        with mm.use():
            taken.set()
            release.wait(30)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert taken.wait(10)
    try:
        yield release
    finally:
        release.set()
        holder.join(10)


@pytest.mark.parametrize("action", ["unload", "offload"])
def test_a_nan_timeout_is_refused_at_once_even_with_a_lease_out(action: str) -> None:
    mm = ManagedModel(tiny, name="nan", device="cpu")
    mm.load()
    call = {
        "unload": lambda: mm.unload(timeout=math.nan),
        "offload": lambda: mm.offload("cpu", timeout=math.nan),
    }[action]
    with leased_elsewhere(mm) as release:
        done, outcome = finishes(call, within=5)
        release.set()  # un-sticks the old code's endless wait, so the test can end
    assert done, f"{action}(timeout=nan) waited forever"
    assert isinstance(outcome, InvalidArgumentError), repr(outcome)
    assert "timeout" in str(outcome)
    mm.unload(wait=True)


@pytest.mark.parametrize("timeout", [math.inf, 1e308, 1e10])
@pytest.mark.parametrize("action", ["unload", "offload"])
def test_a_huge_timeout_waits_for_the_lease_without_overflowing(
    action: str, timeout: float, tmp_path: Path
) -> None:
    mm = ManagedModel(tiny, name="huge", device="cpu", offload_dir=tmp_path)
    mm.load()
    call = {
        "unload": lambda: mm.unload(timeout=timeout),
        "offload": lambda: mm.offload("disk", timeout=timeout),
    }[action]
    with leased_elsewhere(mm) as release:
        threading.Timer(0.2, release.set).start()
        done, outcome = finishes(call, within=20)
    assert done
    assert not isinstance(outcome, BaseException), repr(outcome)
    assert mm.state is (ModelState.UNLOADED if action == "unload" else ModelState.OFFLOADED)
    mm.unload()


@pytest.mark.parametrize("timeout", [math.inf, 1e308])
def test_a_pool_with_no_time_limit_waits_for_room(timeout: float) -> None:
    with ModelPool("cpu", budget="6KiB", headroom=0, timeout=timeout, evict_to="unload") as pool:
        size = 4 * (16 * 16 + 16) * 4 + 16 * 4  # TinyMLP(16)
        pool.register("a", tiny, size_hint=size)
        pool.register("b", tiny, size_hint=size)

        def use_b() -> None:
            with pool.use("b"):
                pass

        with leased_elsewhere(pool["a"]) as release:
            threading.Timer(0.2, release.set).start()
            done, outcome = finishes(use_b, within=20)
        assert done
        assert outcome is None, repr(outcome)
        assert pool["a"].state is ModelState.UNLOADED


def test_unload_without_wait_does_not_sit_through_another_threads_load(
    reliability: Record,
) -> None:
    started, finish = threading.Event(), threading.Event()

    def slow() -> torch.nn.Module:
        started.set()
        finish.wait(30)
        return tiny()

    mm = ManagedModel(slow, name="slow", device="cpu")
    loader = threading.Thread(target=mm.load, daemon=True)
    loader.start()
    assert started.wait(10)
    done, outcome = finishes(mm.unload, within=5)
    load_still_running = not finish.is_set()
    finish.set()
    loader.join(10)
    assert done, "unload() without wait blocked for the other thread's whole load"
    assert load_still_running
    assert isinstance(outcome, ModelBusyError), repr(outcome)
    assert "loading" in str(outcome)
    assert mm.state is ModelState.READY
    assert mm.unload(wait=True).died
    reliability.area = "bad input"
    reliability.bad_inputs = "unload() without wait while another thread loads the model"
    reliability.figures = {"outcome": "ModelBusyError at once"}


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -1.0, "5"],
)
def test_driver_wait_must_be_a_finite_number_of_seconds(value: Any) -> None:
    with pytest.raises(InvalidArgumentError, match="driver_wait must be"):
        ManagedModel(tiny, driver_wait=value)
