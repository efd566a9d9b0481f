"""Eight threads leasing and calling models from a pool while others unload, offload,
wake, prefetch and change the budget, with keep-alive timers firing.

Invariants checked throughout:

- no call ever runs on an unloaded or offloaded object (the model is READY, its
  weights are real, and the output is the reference output);
- leases never go negative, and none is left at the end;
- the budget is never exceeded at any event while it is constant (phase 1);
  after budget changes, once the traffic stops, the pool fits its final budget
  (phase 2);
- no deadlock: every thread ends within a bound;
- every error is one of vramkit's documented errors.
"""

from __future__ import annotations

import faulthandler
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from vramkit import ModelPool, ModelState, VramkitError, events
from vramkit.errors import BudgetExceededError, ModelBusyError, ModelStateError
from vramkit.testing.models import TinyMLP

from ..helpers import reserved_bytes
from .conftest import Record, scale

WIDTH = 256
SIZE = 4 * (WIDTH * WIDTH + WIDTH) * 4 + WIDTH * 4  # TinyMLP(256): ~1 MiB
NAMES = ("asr", "vad", "llm", "tts")
EXPECTED_ERRORS = (BudgetExceededError, ModelBusyError, ModelStateError)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    template = TinyMLP(WIDTH)
    return {k: torch.randn(v.shape, generator=generator) for k, v in template.state_dict().items()}


# Loaders run in many threads at once: weights come from here, not from the
# global RNG that concurrent builds would interleave.
WEIGHTS = {i: _weights(i) for i in range(4)}


def build(seed: int) -> torch.nn.Module:
    module = TinyMLP(WIDTH)
    module.load_state_dict(WEIGHTS[seed])
    return module.eval()


class Harness:
    def __init__(self, pool: ModelPool, seconds: float, *, min_calls: int = 0) -> None:
        self.pool = pool
        self.deadline = time.monotonic() + seconds
        # Progress is counted in calls, not seconds: on a loaded machine the
        # run goes on past ``seconds`` until ``min_calls`` succeeded, bounded
        # by a minute more so a stuck pool still ends (and fails the count).
        self.min_calls = min_calls
        self.hard_deadline = self.deadline + 60
        self.x = torch.ones(1, WIDTH)
        self.reference = {name: build(i)(self.x).detach() for i, name in enumerate(NAMES)}
        self.calls = Counter[str]()
        self.errors = Counter[str]()
        self.unexpected: list[str] = []
        self.violations: list[str] = []
        self.lock = threading.Lock()

    def running(self) -> bool:
        now = time.monotonic()
        if now < self.deadline:
            return True
        with self.lock:
            done = sum(v for k, v in self.calls.items() if not k.startswith("chaos"))
        return done < self.min_calls and now < self.hard_deadline

    def note(self, exc: BaseException) -> None:
        with self.lock:
            if isinstance(exc, EXPECTED_ERRORS):
                self.errors[type(exc).__name__] += 1
            else:
                import traceback

                self.unexpected.append(
                    f"{type(exc).__name__}: {exc}\n"
                    + "".join(traceback.format_tb(exc.__traceback__))
                )

    def violate(self, what: str) -> None:
        with self.lock:
            self.violations.append(what)

    def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        while self.running():
            name = rng.choice(NAMES)
            model = self.pool[name]
            try:
                with self.pool.use(name) as module:
                    if model.state is not ModelState.READY or model.leases < 1:
                        self.violate(f"{name} used while {model.state} with {model.leases} leases")
                    if any(p.is_meta for p in module.parameters()):
                        self.violate(f"{name} used with meta weights")
                    out = module(self.x)
                    if not torch.equal(out, self.reference[name]):
                        self.violate(f"{name} gave a wrong output")
                with self.lock:
                    self.calls[name] += 1
            except Exception as exc:
                self.note(exc)
            time.sleep(rng.random() * 0.002)

    def chaos(self, seed: int, *, budgets: tuple[str, ...] = ()) -> None:
        rng = random.Random(seed)
        actions = ["unload", "offload-cpu", "offload-disk", "wake", "prefetch", "evict"]
        if budgets:
            actions.append("budget")
        while self.running():
            action = rng.choice(actions)
            model = self.pool[rng.choice(NAMES)]
            try:
                if action == "unload":
                    model.unload(timeout=0.05)
                elif action.startswith("offload"):
                    model.offload(action.split("-")[1], timeout=0.05)
                elif action == "wake":
                    model.wake()
                elif action == "prefetch":
                    self.pool.prefetch(model.name).result(timeout=10)
                elif action == "evict":
                    self.pool.evict_idle()
                else:
                    self.pool.set_budget(rng.choice(budgets))
                with self.lock:
                    self.calls[f"chaos:{action}"] += 1
            except Exception as exc:
                self.note(exc)
            time.sleep(rng.random() * 0.01)


def run_threads(targets: list[tuple[Any, tuple[Any, ...]]], bound: float) -> list[str]:
    threads = [threading.Thread(target=t, args=a, daemon=True) for t, a in targets]
    faulthandler.dump_traceback_later(bound + 30, exit=False, file=sys.stderr)
    try:
        for thread in threads:
            thread.start()
        stop = time.monotonic() + bound
        for thread in threads:
            thread.join(max(0.0, stop - time.monotonic()))
    finally:
        faulthandler.cancel_dump_traceback_later()
    return [t.name for t in threads if t.is_alive()]


def make_pool(tmp_path: Path, budget: str) -> ModelPool:
    pool = ModelPool("cpu", budget=budget, headroom=0, timeout=0.3, keep_alive=0.02, name="stress")
    for i, name in enumerate(NAMES):
        pool.register(
            name,
            lambda i=i: build(i),
            size_hint=SIZE,
            offload_dir=tmp_path,
            keep_alive=None if name == "asr" else 0.02,
        )
    return pool


def test_pool_under_concurrent_load_and_chaos(tmp_path: Path, reliability: Record) -> None:
    seconds = scale(6, 120)
    pool = make_pool(tmp_path, "2.6MiB")  # two of the four fit
    harness = Harness(pool, seconds, min_calls=21)
    over: list[str] = []

    def check(event: events.Event) -> None:
        status = pool.status()
        if status.charged_bytes > status.budget_bytes:
            states = ", ".join(
                f"{m.name} {m.state}/{m.device_bytes}/{m.leases}" for m in status.models
            )
            over.append(
                f"{event.kind} {event.model}: {status.charged_bytes} [{states}] "
                f"reserved {reserved_bytes(pool)}"
            )
        for model in pool:
            if model.leases < 0:
                over.append(f"{model.name} has {model.leases} leases")

    unsubscribe = events.subscribe(check)
    try:
        alive = run_threads(
            [(harness.worker, (i,)) for i in range(8)]
            + [(harness.chaos, (100 + i,)) for i in range(2)],
            bound=seconds + 90,
        )
    finally:
        unsubscribe()
    leases = {m.name: m.leases for m in pool}
    pool.close()

    reliability.area = "concurrency"
    reliability.load = (
        f"8 threads leasing 4 pooled models for {seconds} s; 2 threads unloading, offloading "
        "(cpu/disk), waking, prefetching and evicting; keep-alive 20 ms on 3 models"
    )
    reliability.faults = "races between leases, evictions, offloads, wakes and keep-alive expiry"
    reliability.bad_inputs = "none"
    reliability.lost = "nothing" if not (harness.violations or over) else "see failures"
    reliability.figures = {
        "calls": sum(v for k, v in harness.calls.items() if not k.startswith("chaos")),
        "chaos actions": sum(v for k, v in harness.calls.items() if k.startswith("chaos")),
        "documented errors": dict(harness.errors),
        "loads": pool.status().loads,
        "evictions": pool.status().evictions,
    }
    assert alive == [], f"threads did not finish (deadlock?): {alive}"
    assert harness.unexpected == []
    assert harness.violations == []
    assert over == []
    assert leases == dict.fromkeys(NAMES, 0)
    # Progress, not speed: with keep-alive at 20 ms and two chaos threads most
    # calls pay a load or a wake, and every unload proves death with a full gc;
    # the harness runs on (a minute at most) until this many calls succeeded.
    assert sum(harness.calls[n] for n in NAMES) > 20


def test_pool_with_changing_budgets(tmp_path: Path, reliability: Record) -> None:
    seconds = scale(4, 60)
    pool = make_pool(tmp_path, "3.5MiB")
    harness = Harness(pool, seconds)
    budgets = ("1.2MiB", "2.6MiB", "3.5MiB", "8MiB")
    alive = run_threads(
        [(harness.worker, (i,)) for i in range(8)]
        + [(harness.chaos, (200,)), ((lambda: harness.chaos(201, budgets=budgets)), ())],
        bound=seconds + 30,
    )
    leases = {m.name: m.leases for m in pool}
    evicted = pool.set_budget("2.6MiB")  # quiet now: the pool must fit its final budget
    status = pool.status()
    pool.close()

    reliability.area = "concurrency"
    reliability.load = (
        f"8 threads leasing for {seconds} s while the budget changes among "
        f"{', '.join(budgets)} and the other chaos runs"
    )
    reliability.faults = "budget shrinking below what is leased, races with admissions"
    reliability.lost = "nothing" if not harness.violations else "see failures"
    reliability.figures = {
        "calls": sum(harness.calls[n] for n in NAMES),
        "documented errors": dict(harness.errors),
        "evicted when settling": evicted,
        "final charged bytes": status.charged_bytes,
    }
    assert alive == []
    assert harness.unexpected == []
    assert harness.violations == []
    assert leases == dict.fromkeys(NAMES, 0)
    assert status.charged_bytes <= status.budget_bytes


def test_one_model_many_threads_load_once_and_unload_safely(reliability: Record) -> None:
    from vramkit import ManagedModel

    rounds = scale(20, 300)
    loads = Counter[str]()

    def loader() -> torch.nn.Module:
        loads["load"] += 1
        return build(0)

    mm = ManagedModel(loader, name="shared", device="cpu")
    x = torch.ones(1, WIDTH)
    reference = build(0)(x).detach()
    problems: list[str] = []
    errors = Counter[str]()

    def caller() -> None:
        for _ in range(rounds):
            try:
                with mm.use() as module:
                    if not torch.equal(module(x), reference):
                        problems.append("wrong output")
            except Exception as exc:
                if not isinstance(exc, VramkitError):
                    problems.append(repr(exc))
                errors[type(exc).__name__] += 1

    def unloader() -> None:
        for _ in range(rounds):
            try:
                mm.unload(timeout=0.01)
            except ModelBusyError:
                errors["ModelBusyError"] += 1
            time.sleep(0.001)

    alive = run_threads([(caller, ()) for _ in range(8)] + [(unloader, ())], bound=120)
    reliability.area = "concurrency"
    reliability.load = f"8 threads x {rounds} leases on one model, 1 thread unloading in between"
    reliability.faults = "unload racing with first use and with every lease"
    reliability.figures = {"loads": loads["load"], "busy refusals": errors["ModelBusyError"]}
    assert alive == []
    assert problems == []
    assert mm.leases == 0
    assert set(errors) <= {"ModelBusyError"}
