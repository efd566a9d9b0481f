"""Pool admissions that used to slip past the budget, and ``remove()`` racing the pool's own work.

- First loads of models whose size nobody knows are admitted one at a time,
  and the pool evicts after each until its budget holds again (at once, or as
  soon as the leases that pinned the others are returned).
- A model that alone needs more than the whole budget is unloaded and refused.
- A prefetch queued before ``remove()``, or a ``pool.use()`` lease object made
  before it, never loads the removed model.
"""

from __future__ import annotations

import concurrent.futures
import gc
import random
import threading
import time
import weakref
from collections import Counter
from typing import Any

import pytest
import torch

from vramkit import ModelPool, ModelState
from vramkit.errors import BudgetExceededError, ModelStateError, UnknownModelError
from vramkit.testing.models import TinyMLP

from .conftest import Record, scale

MiB = 1024**2
WIDTH = 512
SIZE = 4 * (WIDTH * WIDTH + WIDTH) * 4 + WIDTH * 4  # TinyMLP(512): ~4 MiB


def mlp() -> torch.nn.Module:
    return TinyMLP(WIDTH)


def pool_of(budget: str, **options: Any) -> ModelPool:
    options.setdefault("headroom", 0)
    options.setdefault("evict_to", "unload")
    options.setdefault("timeout", 10)
    return ModelPool("cpu", budget=budget, name="races", **options)


class LoadCounter:
    """Loaders that count how many of them run at once (each takes a moment)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0
        self.built: list[weakref.ref[torch.nn.Module]] = []

    def loader(self) -> torch.nn.Module:
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(0.05)  # widen the window in which concurrent admissions overlap
            module = mlp()
            self.built.append(weakref.ref(module))
            return module
        finally:
            with self.lock:
                self.running -= 1


def test_concurrent_first_loads_of_unknown_size_stay_under_budget(reliability: Record) -> None:
    rounds = scale(3, 30)
    most = 0
    worst_after = 0
    for _ in range(rounds):
        counter = LoadCounter()
        with pool_of("6MiB") as pool:  # room for one model
            for name in "abc":
                pool.register(name, counter.loader)  # no size_hint, no checkpoint
            start = threading.Barrier(3)

            def use(name: str, pool: ModelPool = pool, start: threading.Barrier = start) -> None:
                start.wait(5)
                with pool.use(name) as model:
                    model(torch.ones(1, WIDTH))

            with concurrent.futures.ThreadPoolExecutor(3) as workers:
                for future in [workers.submit(use, n) for n in "abc"]:
                    future.result(timeout=60)
            status = pool.status()
            assert all(m.size_bytes == SIZE for m in status.models)
            worst_after = max(worst_after, status.charged_bytes)
            assert status.charged_bytes <= status.budget_bytes, str(status)
        most = max(most, counter.most)
        assert counter.most == 1, f"{counter.most} loads of unknown size ran at once"
    reliability.area = "concurrency"
    reliability.load = (
        f"{rounds} rounds of 3 threads making the first use of 3 models of unknown size "
        "(no size_hint, no checkpoint) at once, under a budget that fits one"
    )
    reliability.faults = "admissions racing with unknown sizes"
    reliability.figures = {
        "rounds": rounds,
        "most unknown-size loads at once": most,
        "charged after the leases returned (bytes)": worst_after,
        "budget (bytes)": 6 * MiB,
    }


def test_the_pool_gets_back_under_budget_when_the_leases_return() -> None:
    with pool_of("6MiB") as pool:
        # Returned out of order in one thread, leases under inference mode would unwind
        # its guards out of order too and leave this thread in inference mode.
        pool.register("a", mlp, inference_mode=False)
        pool.register("b", mlp, inference_mode=False)
        lease_a, lease_b = pool.use("a"), pool.use("b")
        lease_a.__enter__()
        lease_b.__enter__()  # a is leased: b's first load (size unknown) can only overshoot
        assert pool.status().charged_bytes == 2 * SIZE
        lease_a.__exit__(None, None, None)  # a is idle now: the pool evicts it at once
        status = pool.status()
        assert status.charged_bytes <= status.budget_bytes, str(status)
        assert pool["a"].state is ModelState.UNLOADED
        lease_b.__exit__(None, None, None)
        assert pool["b"].state is ModelState.READY


def test_a_model_larger_than_the_whole_budget_is_unloaded_and_refused() -> None:
    counter = LoadCounter()
    with pool_of("2MiB") as pool:
        pool.register("big", counter.loader)  # ~4 MiB, size unknown until loaded
        message = ""
        try:
            with pool.use("big"):
                raise AssertionError("the block must not run")
        except BudgetExceededError as exc:
            message = str(exc)  # (not pytest.raises: its record keeps the loading frames)
        assert "big" in message
        assert "whole budget" in message
        assert pool["big"].state is ModelState.UNLOADED
        assert pool.status().charged_bytes == 0
        gc.collect()
        assert all(ref() is None for ref in counter.built)
        # The size is known now: the next attempt fails before loading anything.
        with pytest.raises(BudgetExceededError, match="whole budget"):
            pool["big"].load()
        assert len(counter.built) == 1


def test_a_prefetch_queued_before_remove_does_not_load_the_removed_model() -> None:
    gate = threading.Event()

    def slow() -> torch.nn.Module:
        gate.wait(10)
        return mlp()

    with pool_of("64MiB") as pool:
        pool.register("slow", slow, size_hint=SIZE)
        model = pool.register("m", mlp, size_hint=SIZE)
        busy = pool.prefetch("slow")  # occupies the prefetch thread
        queued = pool.prefetch("m")
        removed = pool.remove("m")
        gate.set()
        assert busy.result(timeout=10) is True
        assert queued.result(timeout=10) is False
        assert removed is model
        assert model.state is ModelState.UNLOADED
        assert "m" not in pool


def test_a_lease_object_made_before_remove_does_not_load_the_removed_model() -> None:
    with pool_of("64MiB") as pool:
        model = pool.register("m", mlp, size_hint=SIZE)
        lease = pool.use("m")
        pool.remove("m")
        with pytest.raises(ModelStateError, match="removed"), lease:
            raise AssertionError("the block must not run")
        assert model.state is ModelState.UNLOADED


def _remove_round(preload: bool, delays: list[float]) -> str:
    """remove() racing a prefetch and a lease object made before it; what the lease got."""
    with pool_of("64MiB") as pool:
        model = pool.register("m", mlp, size_hint=SIZE)
        if preload:
            model.load()  # remove() then has an unload to do: a wider window
        lease = pool.use("m")
        start = threading.Barrier(3)
        outcome: dict[str, Any] = {}

        def prefetch() -> None:
            start.wait(5)
            time.sleep(delays[0])
            try:
                outcome["prefetch"] = pool.prefetch("m")
            except UnknownModelError:  # removed before the call: nothing to prefetch
                outcome["prefetch"] = None

        def remove() -> None:
            start.wait(5)
            time.sleep(delays[1])
            pool.remove("m")

        def enter() -> None:
            start.wait(5)
            time.sleep(delays[2])
            try:
                with lease as module:
                    module(torch.ones(1, WIDTH))
                outcome["lease"] = "used"
            except ModelStateError:
                outcome["lease"] = "refused"

        threads = [threading.Thread(target=f) for f in (prefetch, remove, enter)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert not any(t.is_alive() for t in threads), "remove() raced into a hang"
        if outcome["prefetch"] is not None:
            outcome["prefetch"].result(timeout=30)
        assert model.state is ModelState.UNLOADED, "the removed model was loaded"
        assert "m" not in pool
        return str(outcome["lease"])


def test_remove_racing_prefetch_and_leases_never_leaves_a_model_loaded(
    reliability: Record,
) -> None:
    rounds = scale(30, 200)
    jitter = random.Random(13)
    leases = Counter(
        _remove_round(i % 2 == 1, [jitter.uniform(0, 0.003) for _ in range(3)])
        for i in range(rounds)
    )
    reliability.area = "concurrency"
    reliability.load = (
        f"{rounds} rounds of remove() racing a prefetch and a pool.use() lease object "
        "made before it (half of them with the model loaded)"
    )
    reliability.faults = "remove() between a lease's creation and its use; queued prefetches"
    reliability.figures = {
        "rounds": rounds,
        "leases refused (removed first)": leases["refused"],
        "leases used (before the removal)": leases["used"],
        "removed models left loaded": 0,
    }
