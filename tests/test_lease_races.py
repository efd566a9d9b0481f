"""Leases on a READY model take no lock: hammer them against unload and offload.

A lease enters itself, then looks at the state; an unload or offload sets its
state under the lock, then looks at the leases. These tests run both sides in
several threads, with the interpreter switching threads as often as it can, and
check the thing itself inside every lease: the model is READY for the whole
lease and its real weights compute the reference output (a call on an unloaded
or offloaded module raises vramkit's tombstone error instead). No timing is
asserted: the loops are bounded by counts.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from vramkit import ManagedModel, ModelPool, ModelState
from vramkit.errors import ModelBusyError, ModelStateError, UnknownModelError
from vramkit.model._lease import StateMachine

WIDTH = 16
ROUNDS = 150  # leases per thread, each way in turn
POOL_ROUNDS = 50  # leases per thread through a pool, each remove() a full unload


def _build() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(WIDTH, WIDTH), torch.nn.Tanh())


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Switch threads every microsecond, so the lock-free steps interleave."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _watched(problems: list[str]) -> tuple[Callable[[], torch.nn.Module], list[object]]:
    """A loader whose modules report any forward run while their model is not READY."""
    box: list[object] = []  # the ManagedModel, once made

    def loader() -> torch.nn.Module:
        module = _build()

        def watch(*_: object) -> None:
            state = box[0].state  # type: ignore[attr-defined]
            if state is not ModelState.READY:
                problems.append(f"a forward ran on a {state} model")

        module.register_forward_pre_hook(watch)
        module.register_forward_hook(watch)
        return module

    return loader, box


def _hammer(
    mm: ManagedModel[torch.nn.Module], mover: Callable[[int], None], problems: list[str]
) -> Counter[str]:
    """Lease three ways in three threads, ROUNDS each, while ``mover`` runs in between."""
    x = torch.ones(1, WIDTH)
    reference = _build()(x).detach()
    seen = Counter[str]()

    @mm.inference
    def decorated(module: torch.nn.Module) -> torch.Tensor:
        return module(x)

    def through_use() -> torch.Tensor:
        with mm.use() as module:
            return module(x)

    ways: list[tuple[str, Callable[[], torch.Tensor]]] = [
        ("use()", through_use),
        ("@inference", decorated),
        ("mm(x)", lambda: mm(x)),
    ]

    def lessee(offset: int) -> None:
        for turn in range(offset, offset + ROUNDS):
            name, way = ways[turn % len(ways)]
            try:
                out = way()
            except Exception as exc:  # a lease never raises here: any error is a problem
                problems.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            if not torch.equal(out, reference):
                problems.append(f"{name}: wrong output")
            seen[name] += 1
            time.sleep(0.0002)  # gaps, so that unloads and offloads get in

    threads = [threading.Thread(target=lessee, args=(i,), daemon=True) for i in range(3)]
    for thread in threads:
        thread.start()
    move = 0
    while any(thread.is_alive() for thread in threads):
        try:
            mover(move)
            seen["moved"] += 1
        except ModelBusyError:  # refused or timed out while leases were out: as documented
            seen["busy"] += 1
        move += 1
    for thread in threads:
        thread.join()
    return seen


def _check_hammered(
    mm: ManagedModel[torch.nn.Module], seen: Counter[str], problems: list[str]
) -> None:
    """No problem seen, every lease counted, the other side moved, and no lease left out."""
    assert problems == []
    assert seen["use()"] + seen["@inference"] + seen["mm(x)"] == 3 * ROUNDS
    assert seen["moved"] > 0
    assert mm.leases == 0


def test_leases_and_unloads_never_overlap(fast_switching: None) -> None:
    problems: list[str] = []
    loader, box = _watched(problems)
    mm = ManagedModel(loader, device="cpu", name="raced-unload")
    box.append(mm)

    def mover(move: int) -> None:
        if move % 2:
            mm.unload(timeout=0.05)  # waits for the leases out, a little
        else:
            mm.unload()  # refuses with ModelBusyError while a lease is out

    _check_hammered(mm, _hammer(mm, mover, problems), problems)
    mm.unload()
    assert mm.state is ModelState.UNLOADED


def test_leases_and_offloads_never_overlap(fast_switching: None, tmp_path: Path) -> None:
    problems: list[str] = []
    loader, box = _watched(problems)
    mm = ManagedModel(loader, device="cpu", name="raced-offload", offload_dir=tmp_path)
    box.append(mm)

    def mover(move: int) -> None:
        # The disk tier leaves a meta skeleton behind: a call on it would fail loudly.
        if move % 3:
            try:
                mm.offload("disk", timeout=0.05)
            except ModelStateError as exc:  # unloaded just before: as documented
                if "not loaded" not in str(exc):
                    raise
        else:
            mm.unload(timeout=0.05)

    _check_hammered(mm, _hammer(mm, mover, problems), problems)
    mm.unload()


def test_a_lease_taken_in_one_thread_may_end_in_another() -> None:
    # As a server does: the lease is taken in a worker thread and returned from
    # the thread that finishes the request.
    mm = ManagedModel.from_torch(_build, device="cpu", name="handed-over")
    mm.load()
    lease = mm.use()
    taken: list[torch.nn.Module] = []
    worker = threading.Thread(target=lambda: taken.append(lease.__enter__()))
    worker.start()
    worker.join()
    assert taken and mm.leases == 1
    with pytest.raises(ModelBusyError, match="1 lease out"):
        mm.unload()
    taken.clear()
    lease.__exit__(None, None, None)
    assert mm.leases == 0
    assert mm.unload().died


def test_an_unload_waiting_for_a_lock_free_lease_is_woken_by_its_return() -> None:
    mm = ManagedModel.from_torch(_build, device="cpu", name="woken")
    mm.load()
    inside, release = threading.Event(), threading.Event()

    def hold() -> None:
        with mm.use():
            inside.set()
            release.wait(60)

    holder = threading.Thread(target=hold)
    holder.start()
    inside.wait(60)
    unloaded: list[bool] = []
    unloader = threading.Thread(target=lambda: unloaded.append(mm.unload(wait=True).died))
    unloader.start()
    # The unloader counts itself among the claims before it looks at the leases,
    # so the return below wakes it whether it is already waiting or not yet.
    release.set()
    holder.join(60)
    unloader.join(60)
    assert not unloader.is_alive(), "the unload was never woken"
    assert unloaded == [True]
    assert mm.state is ModelState.UNLOADED


def test_a_lease_taken_while_an_unload_looks_is_seen_by_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The one interleaving the lock-free lease must survive, made to happen: the
    # unload has looked at the leases (none) and not yet changed the state when
    # a lease comes in and sees READY. The unload must then see that lease.
    mm = ManagedModel.from_torch(_build, device="cpu", name="window")
    mm.load()
    x = torch.ones(1, WIDTH)
    reference = _build()(x).detach()
    inside, release = threading.Event(), threading.Event()
    outputs: list[tuple[ModelState, torch.Tensor]] = []

    def lessee() -> None:
        with mm.use() as module:
            inside.set()
            release.wait(60)
            outputs.append((mm.state, module(x)))

    thread = threading.Thread(target=lessee)
    real = StateMachine.snapshot

    def snapshot(self: StateMachine[object]) -> tuple[tuple[int, float, object], ...]:
        seen = real(self)
        if threading.current_thread() is threading.main_thread() and thread.ident is None:
            thread.start()  # the lease comes in between the look and the state change
            inside.wait(60)
        return seen

    monkeypatch.setattr(StateMachine, "snapshot", snapshot)
    with pytest.raises(ModelBusyError, match="1 lease out"):
        mm.unload()
    release.set()
    thread.join(60)
    assert len(outputs) == 1
    state, out = outputs[0]
    assert state is ModelState.READY
    assert torch.equal(out, reference)
    assert mm.unload().died


# -- leases through a pool: lock-free too, against remove() ---------------------------


def _race(
    lessee: Callable[[Counter[str]], None], counts: list[Counter[str]], step: Callable[[], object]
) -> None:
    """Run ``lessee`` on a thread per counter, doing ``step`` over and over until all end."""
    threads = [threading.Thread(target=lessee, args=(c,), daemon=True) for c in counts]
    for thread in threads:
        thread.start()
    while any(thread.is_alive() for thread in threads):
        step()
    for thread in threads:
        thread.join()


def test_pool_leases_and_removes_never_overlap(fast_switching: None) -> None:
    # Leases through the pool take no lock: they enter, see READY, then read the
    # owner. remove() unloads (waiting for the leases out) and lets the model
    # leave only once unloaded. Inside every lease the model must be READY and
    # still the pool's; right after remove() returns, no lease may be out; and a
    # lease on the removed model is refused, never granted.
    problems: list[str] = []
    loader, box = _watched(problems)
    x = torch.ones(1, WIDTH)
    reference = _build()(x).detach()
    with ModelPool("cpu", budget="64MiB", headroom=0, name="raced-pool") as pool:
        mm = pool.register("m", loader)
        box.append(mm)
        counts = [Counter[str]() for _ in range(3)]  # one per thread: += is not atomic

        def lessee(seen: Counter[str]) -> None:
            for _ in range(POOL_ROUNDS):
                try:
                    with pool.use("m") as module:
                        if mm.pool is not pool or "m" not in pool:
                            problems.append("a lease got a model that left the pool")
                        if not torch.equal(module(x), reference):
                            problems.append("wrong output")
                    seen["leased"] += 1
                except ModelStateError as exc:  # removed between pool.use() and the block
                    if "removed" not in str(exc):
                        problems.append(f"{type(exc).__name__}: {exc}")
                    seen["refused"] += 1
                except UnknownModelError:  # looked up while out of the pool
                    seen["absent"] += 1
                except Exception as exc:  # anything else is a problem
                    problems.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.0002)

        removes = 0

        def remove_and_add() -> None:
            nonlocal removes
            removed = pool.remove("m")
            if removed.leases:
                problems.append(f"remove() returned with {removed.leases} lease(s) out")
            if removed.state is not ModelState.UNLOADED or removed.pool is not None:
                problems.append(f"remove() left the model {removed.state}, owned")
            removes += 1
            pool.add(removed)

        _race(lessee, counts, remove_and_add)
    seen = sum(counts, Counter[str]())
    assert problems == []
    assert seen["leased"] + seen["refused"] + seen["absent"] == 3 * POOL_ROUNDS
    assert removes > 0 and seen["leased"] > 0


def test_pool_leases_and_evictions_never_overlap(fast_switching: None) -> None:
    # The pool evicts idle members (unloading or offloading them) with the same
    # claim an unload makes: a lock-free lease through the pool must never run
    # on a member that was evicted under it.
    problems: list[str] = []
    x = torch.ones(1, WIDTH)
    reference = _build()(x).detach()
    with ModelPool("cpu", budget="64MiB", headroom=0, name="raced-evict") as pool:
        for name in ("a", "b"):
            loader, box = _watched(problems)
            box.append(pool.register(name, loader))
        counts = [Counter[str]() for _ in range(3)]

        def lessee(seen: Counter[str]) -> None:
            for turn in range(ROUNDS):
                name = "ab"[turn % 2]
                try:
                    with pool.use(name) as module:
                        if not torch.equal(module(x), reference):
                            problems.append("wrong output")
                    seen["leased"] += 1
                except Exception as exc:  # a lease through the pool never fails here
                    problems.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.0002)

        evicted = 0

        def evict() -> None:
            nonlocal evicted
            evicted += len(pool.evict_idle())

        _race(lessee, counts, evict)
    assert problems == []
    assert sum(c["leased"] for c in counts) == 3 * ROUNDS
    assert evicted > 0


def test_a_stale_pool_lease_is_refused_even_when_the_model_is_loaded_again() -> None:
    # The lock-free way sees a READY model: only the owner, read after the lease
    # is in, tells that the model left the pool since the lease object was made.
    with ModelPool("cpu", budget="64MiB", headroom=0, name="stale") as pool:
        mm = pool.register("m", _build)
        lease = pool.use("m")
        pool.remove("m")
        mm.load()  # directly, outside any pool
        with pytest.raises(ModelStateError, match="removed"), lease:
            raise AssertionError("the block must not run")
        assert mm.leases == 0
        assert mm.unload().died


def test_a_model_leaves_its_pool_only_unloaded() -> None:
    # What the lock-free pool lease relies on: a READY model is still its pool's.
    # (remove() unloads first; a model loaded again in between is unloaded again.)
    with ModelPool("cpu", budget="64MiB", headroom=0, name="leaving") as pool:
        mm = pool.register("m", _build)
        mm.load()
        assert mm._leave(pool) is False
        assert mm.pool is pool
        mm.unload()
        assert mm._leave(pool) is True
        assert mm.pool is None
