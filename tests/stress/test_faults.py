"""Faults injected at every step: loaders that fail half-way, releases that raise,
KeyboardInterrupt during load and unload, disk errors in the disk tier, an OOM in
the middle of a wake.

After each: the model is in a documented state, the pool's accounting matches
reality, the memory came back (the tensors it built are dead), and nothing was
lost: the user's configuration still loads the same model.
"""

from __future__ import annotations

import gc
import random
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import vramkit
from vramkit import ManagedModel, ModelPool, ModelState
from vramkit.adapters import TorchAdapter
from vramkit.errors import BudgetExceededError, ModelStateError, OffloadError

from ..helpers import reserved_bytes
from .conftest import Record, scale

WIDTH = 256
MiB = 1024**2


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    layers = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)))
    return {k: torch.randn(v.shape, generator=generator) for k, v in layers.state_dict().items()}


WEIGHTS = weights()
X = torch.ones(1, WIDTH)


def build() -> torch.nn.Module:
    module = torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH) for _ in range(4)))
    module.load_state_dict(WEIGHTS)
    return module.eval()


REFERENCE = build()(X).detach()


class Tracker:
    """Remembers weak references to every module the loaders build."""

    def __init__(self) -> None:
        self.built: list[weakref.ref[torch.nn.Module]] = []

    def track(self, module: torch.nn.Module) -> torch.nn.Module:
        self.built.append(weakref.ref(module))
        return module

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.built)


def same_model(mm: ManagedModel[Any]) -> bool:
    with mm.use() as module:
        return bool(torch.equal(module(X), REFERENCE))


def test_loaders_failing_at_random_points(reliability: Record) -> None:
    rounds = scale(20, 200)
    rng = random.Random(7)
    tracker = Tracker()
    pool = ModelPool("cpu", budget="2MiB", headroom=0, name="faulty", timeout=0.2)
    failures = 0
    plan: dict[str, int] = {}

    def loader_for(name: str) -> Any:
        def load() -> torch.nn.Module:
            steps = plan.pop(name, -1)
            module = torch.nn.Sequential()
            for step in range(4):
                if step == steps:
                    raise RuntimeError(f"{name}: injected failure at layer {step}")
                module.append(tracker.track(torch.nn.Linear(WIDTH, WIDTH)))
            module.load_state_dict(WEIGHTS)
            return tracker.track(module.eval())

        return load

    names = ["a", "b", "c"]
    for name in names:
        pool.register(name, loader_for(name), size_hint=4 * (WIDTH * WIDTH + WIDTH) * 4)
    for _ in range(rounds):
        name = rng.choice(names)
        if rng.random() < 0.5:
            plan[name] = rng.randrange(4)
        try:
            assert same_model(pool[name])
        except RuntimeError as exc:
            if "injected failure" not in str(exc):
                raise
            failures += 1
            assert pool[name].state is ModelState.UNLOADED
            assert reserved_bytes(pool) == 0
        status = pool.status()
        resident = sum(m.size_bytes or 0 for m in pool if m.state is ModelState.READY)
        assert status.charged_bytes == resident  # the accounting matches reality
        assert status.charged_bytes <= status.budget_bytes
    pool.close()
    leftover = tracker.alive()
    reliability.area = "faults"
    reliability.load = f"{rounds} uses of 3 pooled models under a 2-model budget"
    reliability.faults = f"{failures} loaders raising at a random layer (of 4)"
    reliability.lost = "nothing" if leftover == 0 else f"{leftover} modules survived"
    reliability.figures = {"failed loads": failures, "modules alive after close": leftover}
    assert failures > 0
    assert leftover == 0


class FailingRelease(TorchAdapter):
    """Raises the given error on the first release only."""

    def __init__(self, error: BaseException) -> None:
        self.errors = [error]

    def release(self, obj: object) -> None:
        if self.errors:
            raise self.errors.pop()


@pytest.mark.parametrize(
    "error",
    [RuntimeError("driver said no"), KeyboardInterrupt()],
    ids=["exception", "keyboard-interrupt"],
)
def test_release_that_raises(error: BaseException, reliability: Record) -> None:
    tracker = Tracker()
    pool = ModelPool("cpu", budget="8MiB", headroom=0, name="release")
    mm = pool.add(
        ManagedModel(
            lambda: tracker.track(build()), name="m", device="cpu", adapter=FailingRelease(error)
        )
    )
    assert same_model(mm)
    expected = ModelStateError if isinstance(error, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        mm.unload()
    assert mm.state is ModelState.UNLOADED
    assert pool.status().charged_bytes == 0
    assert tracker.alive() == 0  # dropped anyway: the memory came back
    assert same_model(mm)  # and the configuration still loads the same model
    pool.close()
    reliability.area = "faults"
    reliability.load = "one pooled model, loaded, unloaded, reloaded"
    reliability.faults = f"adapter release raising {type(error).__name__}"
    reliability.figures = {"state after": "UNLOADED", "modules alive": 0}


def test_keyboard_interrupt_during_load(reliability: Record) -> None:
    tracker = Tracker()
    interrupts = [True]

    def load() -> torch.nn.Module:
        module = tracker.track(build())
        if interrupts and interrupts.pop():
            raise KeyboardInterrupt
        return module

    pool = ModelPool("cpu", budget="8MiB", headroom=0, name="interrupted")
    mm = pool.register("m", load, size_hint=MiB)
    with pytest.raises(KeyboardInterrupt):
        mm.load()
    assert mm.state is ModelState.UNLOADED
    assert pool.status().charged_bytes == 0
    assert reserved_bytes(pool) == 0
    assert tracker.alive() == 0
    assert same_model(mm)
    pool.close()
    reliability.area = "faults"
    reliability.load = "one pooled model"
    reliability.faults = "KeyboardInterrupt inside the loader"
    reliability.figures = {"reservation left": 0, "modules alive": 0}


def test_disk_errors_while_evicting_fall_back_to_unloading(
    tmp_path: Path, reliability: Record
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("a file where the cache directory should be")
    pool = ModelPool("cpu", budget="1.5MiB", headroom=0, evict_to="disk", name="disk")
    for name in ("a", "b"):
        pool.register(name, build, offload_dir=blocked / "cache", size_hint=1)
    assert same_model(pool["a"])
    assert same_model(pool["b"])  # evicting a to disk fails: a is unloaded instead
    assert pool["a"].state is ModelState.UNLOADED
    assert pool.status().charged_bytes == pool["b"].size_bytes
    with pytest.raises(OffloadError, match="nothing was lost"):
        pool["b"].offload("disk")
    assert pool["b"].state is ModelState.READY
    assert same_model(pool["b"])
    assert same_model(pool["a"])
    pool.close()
    reliability.area = "faults"
    reliability.load = "2 pooled models under a 1-model budget, evicting to disk"
    reliability.faults = "unwritable cache directory during eviction and explicit offload"
    reliability.figures = {"fallback": "unload", "model after failed offload": "READY"}


def test_out_of_memory_in_the_middle_of_a_wake(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reliability: Record
) -> None:
    from vramkit.model import tiers

    pool = ModelPool("cpu", budget="8MiB", headroom=0, name="wake")
    mm = pool.register("m", build, offload_dir=tmp_path)
    assert same_model(mm)
    mm.offload("disk")
    calls = [0]

    def bring_back_then_fail(tensors: Any, data: Any) -> None:
        # Giving the weights back to the model's own tensors is where a real wake
        # runs out of device memory.
        calls[0] += 1
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    with monkeypatch.context() as patched:
        patched.setattr(tiers, "_bring_back", bring_back_then_fail)
        with pytest.raises(torch.OutOfMemoryError):
            mm.wake()
    assert calls[0] == 1
    assert mm.state is ModelState.OFFLOADED
    assert mm.tier == "disk"
    assert pool.status().charged_bytes == 0
    assert reserved_bytes(pool) == 0
    assert same_model(mm)  # the file was intact: the next wake works
    assert mm.stats.loads == 1  # without falling back to the loader
    pool.close()
    reliability.area = "faults"
    reliability.load = "one pooled model offloaded to disk"
    reliability.faults = "torch.OutOfMemoryError raised while the weights were read back"
    reliability.figures = {"state after": "OFFLOADED (disk)", "reloads needed": 0}


def test_budget_refusal_during_a_wake_keeps_the_model_offloaded(
    tmp_path: Path, reliability: Record
) -> None:
    pool = ModelPool("cpu", budget="1.2MiB", headroom=0, name="refuse", timeout=0.1)
    a = pool.register("a", build, offload_dir=tmp_path)
    b = pool.register("b", build, offload_dir=tmp_path)
    assert same_model(a)
    a.offload("disk")
    with b.use():
        with pytest.raises(BudgetExceededError):
            a.wake()
        assert a.state is ModelState.OFFLOADED
    assert same_model(a)
    assert a.stats.loads == 1
    pool.close()
    reliability.area = "faults"
    reliability.load = "2 pooled models, one leased, the other offloaded"
    reliability.faults = "wake refused by the budget"
    reliability.figures = {"state after refusal": "OFFLOADED", "reloads needed": 0}


def test_memory_returns_after_every_fault(tmp_path: Path, reliability: Record) -> None:
    """Many faulty cycles in a row leave the process where it started."""
    cycles = scale(15, 150)
    mm = ManagedModel(build, name="cycled", device="cpu", offload_dir=tmp_path)
    same_model(mm)
    mm.unload()
    vramkit.cleanup("cpu")
    before = vramkit.snapshot("cpu")["cpu"].process_used_bytes or 0
    for i in range(cycles):
        same_model(mm)
        parked = mm.offload("disk" if i % 2 else "cpu")
        if i % 3 == 0 and parked.path is not None:
            Path(parked.path).unlink(missing_ok=True)
        same_model(mm)  # wake, falling back to the loader when the file was deleted
        mm.unload()
    vramkit.cleanup("cpu")
    after = vramkit.snapshot("cpu")["cpu"].process_used_bytes or 0
    reliability.area = "faults"
    reliability.load = f"{cycles} load/offload/wake/unload cycles"
    reliability.faults = "cache file deleted behind vramkit's back every third cycle"
    reliability.figures = {"RSS growth MiB": round((after - before) / MiB, 1)}
    assert after - before < 16 * MiB
