"""Cancelled async requests mixed with threads: no lease is ever left without an owner.

Tasks borrow pooled models with ``async with pool.use(name)`` (and
``async with mm.use()``) under ``asyncio.wait_for`` timeouts and outright
``task.cancel()``, most often while the model is still loading or waking;
other tasks unload through ``asyncio.to_thread(mm.unload, wait=True)`` and
threads evict, offload and unload at the same time. At the end no lease is
out, and ``unload(wait=True)`` and ``pool.close()`` return.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from vramkit import ManagedModel, ModelPool, ModelState
from vramkit.errors import BudgetExceededError, ModelBusyError, ModelStateError
from vramkit.testing.models import TinyMLP

from .conftest import LONG, Record, scale

WIDTH = 64
NAMES = ("asr", "llm", "tts")
EXPECTED = (BudgetExceededError, ModelBusyError, ModelStateError)


def slow_build() -> torch.nn.Module:
    time.sleep(random.uniform(0.001, 0.01))  # a load that a short timeout can interrupt
    return TinyMLP(WIDTH)


class Traffic:
    def __init__(self, pool: ModelPool, seconds: float) -> None:
        self.pool = pool
        self.deadline = time.monotonic() + seconds
        self.counts = Counter[str]()
        self.unexpected: list[str] = []
        self.x = torch.ones(1, WIDTH)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def note(self, exc: BaseException, where: str) -> None:
        if isinstance(exc, ModelBusyError) and "inside its own lease" in str(exc):
            self.unexpected.append(f"{where}: refused as its own lease: {exc}")
        elif isinstance(exc, EXPECTED):
            self.counts[type(exc).__name__] += 1
        else:
            self.unexpected.append(f"{where}: {type(exc).__name__}: {exc}")

    async def borrow(self, rng: random.Random) -> None:
        name = rng.choice(NAMES)
        lease = self.pool.use(name) if rng.random() < 0.7 else self.pool[name].use()
        async with lease as module:
            await asyncio.sleep(0)
            module(self.x)

    async def requester(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            try:
                await asyncio.wait_for(self.borrow(rng), timeout=rng.uniform(0, 0.012))
                self.counts["served"] += 1
            except TimeoutError:
                self.counts["timed out"] += 1
            except Exception as exc:
                self.note(exc, "request")

    async def canceller(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            task = asyncio.ensure_future(self.borrow(rng))
            await asyncio.sleep(rng.uniform(0, 0.006))
            task.cancel()
            try:
                await task
                self.counts["served"] += 1
            except asyncio.CancelledError:
                self.counts["cancelled"] += 1
            except Exception as exc:
                self.note(exc, "cancelled request")

    async def async_unloader(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            model = self.pool[rng.choice(NAMES)]
            try:
                await asyncio.to_thread(model.unload, wait=True, timeout=0.05)
                self.counts["unloaded from a task"] += 1
            except Exception as exc:
                self.note(exc, "to_thread unload")
            await asyncio.sleep(rng.uniform(0, 0.01))

    def chaos(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            model = self.pool[rng.choice(NAMES)]
            action = rng.choice(["unload", "offload-cpu", "offload-disk", "evict"])
            try:
                if action == "unload":
                    model.unload(timeout=0.02)
                elif action == "evict":
                    self.pool.evict_idle()
                else:
                    model.offload(action.split("-")[1], timeout=0.02)
                self.counts[f"chaos {action}"] += 1
            except Exception as exc:
                self.note(exc, f"chaos {action}")
            time.sleep(rng.uniform(0, 0.005))

    async def run(self) -> None:
        tasks = [self.requester(i) for i in range(8)]
        tasks += [self.canceller(100 + i) for i in range(4)]
        tasks += [self.async_unloader(200 + i) for i in range(2)]
        await asyncio.gather(*tasks)


def finishes(call: Any, within: float) -> bool:
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(within)
    return not thread.is_alive()


def test_cancelled_async_requests_never_leak_a_lease(tmp_path: Path, reliability: Record) -> None:
    # CI runs a short version; the long one (VRAMKIT_STRESS=long) runs 60 s.
    seconds = scale(5, 60)
    size = 4 * (WIDTH * WIDTH + WIDTH) * 4 + WIDTH * 4
    pool = ModelPool(
        "cpu", budget=int(2.5 * size), headroom=0, timeout=0.2, keep_alive=0.01, name="cancel"
    )
    for name in NAMES:
        pool.register(name, slow_build, size_hint=size, offload_dir=tmp_path)
    traffic = Traffic(pool, seconds)
    chaos = [threading.Thread(target=traffic.chaos, args=(300 + i,), daemon=True) for i in range(2)]
    for thread in chaos:
        thread.start()
    asyncio.run(traffic.run())
    for thread in chaos:
        thread.join(30)
    time.sleep(0.1)  # loads that cancelled requests left running in worker threads finish
    leases = {m.name: m.leases for m in pool}
    unloaded = all(finishes(lambda m=m: m.unload(wait=True, timeout=10), 15) for m in pool)
    closed = finishes(pool.close, 30)
    reliability.area = "concurrency"
    reliability.load = (
        f"{seconds} s of 8 asyncio tasks borrowing 3 pooled models under wait_for timeouts "
        "of 0-12 ms, 4 tasks cancelling their requests mid-load, 2 tasks unloading through "
        "asyncio.to_thread, 2 threads unloading, offloading and evicting"
        + ("" if LONG else " (short CI version)")
    )
    reliability.faults = "cancellation at every await of an async lease, mostly during loads"
    reliability.lost = "nothing" if not any(leases.values()) else f"leases left: {leases}"
    reliability.figures = {
        "requests served": traffic.counts["served"],
        "timed out": traffic.counts["timed out"],
        "cancelled": traffic.counts["cancelled"],
        "leases left": sum(leases.values()),
        "documented errors": {k: v for k, v in traffic.counts.items() if k.endswith("Error")},
    }
    assert traffic.unexpected == []
    assert leases == dict.fromkeys(NAMES, 0), "a cancelled request kept its lease"
    assert unloaded, "unload(wait=True) did not return"
    assert closed, "pool.close() did not return"
    assert all(m.state is ModelState.UNLOADED for m in pool)
    assert traffic.counts["cancelled"] + traffic.counts["timed out"] > 0


def test_a_lease_cancelled_while_loading_is_given_back() -> None:
    started, finish = threading.Event(), threading.Event()

    def gated() -> torch.nn.Module:
        started.set()
        finish.wait(10)
        return TinyMLP(WIDTH)

    mm = ManagedModel(gated, name="gated", device="cpu")

    async def scenario() -> None:
        async def borrow() -> None:
            async with mm.use():
                raise AssertionError("the cancelled request must not run")

        task = asyncio.ensure_future(borrow())
        await asyncio.to_thread(started.wait, 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        finish.set()

    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while mm.state is not ModelState.READY and time.monotonic() < deadline:
        time.sleep(0.01)  # the load itself completes in its worker thread
    assert mm.leases == 0
    assert finishes(lambda: mm.unload(wait=True, timeout=5), 10)
    assert mm.state is ModelState.UNLOADED


def test_an_async_lease_belongs_to_its_task_not_to_a_worker_thread() -> None:
    mm = ManagedModel(lambda: TinyMLP(WIDTH), name="owned", device="cpu")

    async def scenario() -> list[str]:
        # One worker thread: the unload below runs on the very thread that loaded.
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(1))
        refused: list[str] = []
        for _ in range(5):
            await asyncio.to_thread(mm.unload)
            async with mm.use():  # loads in a worker thread
                try:
                    await asyncio.to_thread(mm.unload, timeout=0)
                except ModelBusyError as exc:
                    if "inside its own lease" in str(exc):
                        refused.append(str(exc))
        return refused

    loop_refusals = asyncio.run(scenario())
    assert loop_refusals == []
    assert mm.leases == 0
