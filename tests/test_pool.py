"""ModelPool with real torch modules on the cpu device (host RAM is the budget)."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
import weakref
from pathlib import Path
from typing import Any

import pytest
import torch

import vramkit
from vramkit import ModelPool, ModelState, events
from vramkit.errors import (
    BudgetExceededError,
    DeviceUnavailableError,
    InvalidArgumentError,
    ModelStateError,
)
from vramkit.testing.models import TinyMLP

from .helpers import reserved_bytes

MiB = 1024**2
SIZE = 4 * MiB + 4 * 512 * 4 + 512 * 4  # TinyMLP(512): 4 layers of weights and biases + buffer


def mlp() -> torch.nn.Module:
    return TinyMLP(512)


def make_pool(budget: str = "10MiB", **options: Any) -> ModelPool:
    options.setdefault("headroom", 0)
    options.setdefault("evict_to", "unload")
    options.setdefault("timeout", 0.5)
    return ModelPool("cpu", budget=budget, name="test", **options)


def run(pool: ModelPool, name: str) -> None:
    with pool.use(name) as model:
        model(torch.ones(1, 512))


@pytest.fixture
def recorded() -> Any:
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    yield seen
    unsubscribe()


def test_least_recently_used_is_evicted_first(recorded: list[events.Event]) -> None:
    with make_pool() as pool:
        for name in "abc":
            pool.register(name, mlp, size_hint=SIZE)
        for name in "ab":
            run(pool, name)
        run(pool, "a")  # b is now the least recently used
        run(pool, "c")
        evicted = [e.model for e in recorded if e.kind == "evict"]
        assert evicted == ["b"]
        assert pool["a"].state is ModelState.READY
        assert pool["b"].state is ModelState.UNLOADED


def test_pinned_models_go_last_and_leased_models_never(recorded: list[events.Event]) -> None:
    with make_pool() as pool:
        pool.register("pinned", mlp, size_hint=SIZE, pin=True)
        pool.register("b", mlp, size_hint=SIZE)
        pool.register("c", mlp, size_hint=SIZE)
        run(pool, "pinned")
        run(pool, "b")
        run(pool, "c")  # pinned is least recent, but b goes first
        assert [e.model for e in recorded if e.kind == "evict"] == ["b"]
        with pool.use("c"):
            run(pool, "b")  # c is leased: the pinned model has to go
        assert [e.model for e in recorded if e.kind == "evict"] == ["b", "pinned"]
        assert pool["c"].state is ModelState.READY


def test_budget_is_never_exceeded_at_any_event() -> None:
    charged: list[tuple[str, int, int]] = []
    pool = make_pool("9MiB")

    def check(event: events.Event) -> None:
        status = pool.status()
        charged.append((event.kind, status.charged_bytes, status.budget_bytes))

    unsubscribe = events.subscribe(check)
    try:
        for name in "abcd":
            pool.register(name, mlp, size_hint=SIZE)
        for name in "abcdbadcab" * 2:
            run(pool, name)
    finally:
        unsubscribe()
        pool.close()
    assert charged
    assert all(used <= budget for _, used, budget in charged), charged
    assert pool.status().peak_charged_bytes <= 9 * MiB


def test_a_failed_disk_eviction_is_logged_once_naming_the_model(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "a-file"
    blocked.write_text("where the cache directory should be")
    with make_pool("6MiB", evict_to="disk") as pool:
        pool.register("asr", mlp, size_hint=SIZE, offload_dir=blocked / "cache")
        pool.register("llm", mlp, size_hint=SIZE)
        run(pool, "asr")
        with caplog.at_level(logging.WARNING, logger="vramkit"):
            run(pool, "llm")  # evicting asr to disk fails: it is unloaded instead
        assert pool["asr"].state is ModelState.UNLOADED
    (record,) = [r for r in caplog.records if "unloading instead" in r.getMessage()]
    message = record.getMessage()
    assert message.startswith("asr: evicting to the disk tier failed (could not write")
    assert message.count("asr") == 1


def test_the_default_headroom_fits_a_small_budget() -> None:
    # A fixed 512 MiB default refused every model under a 64 MiB budget.
    with ModelPool("cpu", budget="64MiB", evict_to="unload") as pool:
        pool.register("small", mlp, size_hint=SIZE)
        run(pool, "small")
        assert pool["small"].state is ModelState.READY
        assert pool.status().headroom_bytes == 8 * MiB  # an eighth of the budget


@pytest.mark.parametrize(
    ("budget", "headroom", "expected"),
    [("64GiB", None, 512 * MiB), ("1GiB", None, 128 * MiB), ("64MiB", "1MiB", MiB)],
)
def test_the_default_headroom_is_an_eighth_capped_and_a_given_one_is_kept(
    budget: str, headroom: str | None, expected: int
) -> None:
    with ModelPool("cpu", budget=budget, headroom=headroom) as pool:
        assert pool.status().headroom_bytes == expected


@pytest.mark.timeout(120)
def test_a_model_larger_than_the_budget_fails_at_once() -> None:
    # A pool that waited for room would sit out its hour-long timeout and fail
    # the test through pytest-timeout instead of raising here.
    with make_pool("2MiB", timeout=3600) as pool:
        pool.register("big", mlp, size_hint=SIZE)
        with pytest.raises(
            BudgetExceededError, match=r"big needs 4\.0 MiB .* whole budget .* 2\.0 MiB"
        ) as refused:
            run(pool, "big")
        assert "after waiting" not in str(refused.value)
        assert pool["big"].state is ModelState.UNLOADED
        assert pool.status().charged_bytes == 0


def test_no_room_waits_then_names_who_holds_what() -> None:
    with make_pool("6MiB", timeout=0.3) as pool:
        pool.register("a", mlp, size_hint=SIZE)
        pool.register("b", mlp, size_hint=SIZE)
        with pool.use("a"):
            started = time.monotonic()
            with pytest.raises(BudgetExceededError) as info:
                run(pool, "b")
            assert time.monotonic() - started >= 0.3  # it waited out its timeout first
        message = str(info.value)
        assert "no room for b" in message
        assert "a 4.0 MiB (1 leases)" in message
        assert pool.status().charged_bytes == SIZE  # the failed admission reserved nothing


def test_a_load_waits_for_a_lease_to_end() -> None:
    with make_pool("6MiB", timeout=5) as pool:
        pool.register("a", mlp, size_hint=SIZE)
        pool.register("b", mlp, size_hint=SIZE)
        taken, release = threading.Event(), threading.Event()

        def hold() -> None:
            with pool.use("a"):
                taken.set()
                release.wait(5)

        worker = threading.Thread(target=hold)
        worker.start()
        taken.wait(5)
        threading.Timer(0.2, release.set).start()
        run(pool, "b")  # waits for a's lease, then evicts a
        worker.join(5)
        assert pool["a"].state is ModelState.UNLOADED
        assert pool["b"].state is ModelState.READY


def test_failure_mid_load_leaves_the_accounting_right() -> None:
    calls = []

    def flaky() -> torch.nn.Module:
        calls.append(1)
        module = TinyMLP(512)
        if len(calls) == 1:
            raise RuntimeError("load failed half-way")
        return module

    with make_pool() as pool:
        pool.register("flaky", flaky, size_hint=SIZE)
        pool.register("b", mlp, size_hint=SIZE)
        with pytest.raises(RuntimeError, match="half-way"):
            run(pool, "flaky")
        status = pool.status()
        assert status.charged_bytes == 0
        assert reserved_bytes(pool) == 0
        run(pool, "b")
        run(pool, "flaky")
        assert pool.status().charged_bytes == 2 * SIZE


def test_unknown_sizes_are_corrected_after_the_first_load(recorded: list[events.Event]) -> None:
    with make_pool("9MiB") as pool:
        for name in "abc":
            pool.register(name, mlp)  # no size hint: measured at load
        run(pool, "a")
        run(pool, "b")  # unknown size: idle models make room first
        assert pool["b"].size_bytes == SIZE
        run(pool, "a")
        run(pool, "c")
        assert pool.status().charged_bytes <= 9 * MiB


def test_belady_plan_evicts_the_model_needed_furthest_ahead(recorded: list[events.Event]) -> None:
    with make_pool() as pool:
        for name in "abc":
            pool.register(name, mlp, size_hint=SIZE)
        run(pool, "a")
        run(pool, "b")
        pool.plan(["c", "a", "b"])  # LRU would evict a; a is needed before b
        run(pool, "c")
        assert [e.model for e in recorded if e.kind == "evict"] == ["b"]
        with pytest.raises(InvalidArgumentError, match="not in the pool"):
            pool.plan(["zzz"])


def test_eviction_to_a_tier_chosen_from_costs(tmp_path: Any) -> None:
    def slow_mlp() -> torch.nn.Module:
        time.sleep(0.5)  # a reload that clearly costs more than mapping 4 MiB back, however busy
        return mlp()

    with make_pool(evict_to="auto") as pool:
        pool.register("a", slow_mlp, size_hint=SIZE, offload_dir=tmp_path)
        for name in "bc":
            pool.register(name, mlp, size_hint=SIZE, offload_dir=tmp_path)
        run(pool, "a")
        pool["a"].offload("disk")  # a measured disk wake: cheaper than a reload
        run(pool, "a")
        run(pool, "b")
        run(pool, "c")  # a is evicted: on cpu the cpu tier frees nothing, disk wins
        assert pool["a"].state is ModelState.OFFLOADED
        assert pool["a"].tier == "disk"
        run(pool, "a")  # wakes from disk under the budget
        assert pool["a"].stats.wakes == 2


def test_keep_alive_with_a_controlled_clock() -> None:
    now = [0.0]
    with make_pool(keep_alive=60, clock=lambda: now[0], start_threads=False) as pool:
        pool.register("a", mlp, size_hint=SIZE)
        pool.register("forever", mlp, size_hint=SIZE, keep_alive=None)
        run(pool, "a")
        run(pool, "forever")
        now[0] = 59
        pool.run_expiry()
        assert pool["a"].state is ModelState.READY
        now[0] = 61
        pool.run_expiry()
        assert pool["a"].state is ModelState.UNLOADED
        assert pool["forever"].state is ModelState.READY


def test_keep_alive_zero_and_the_thread_stops_on_close() -> None:
    pool = make_pool(keep_alive=0)
    pool.register("a", mlp, size_hint=SIZE)
    run(pool, "a")
    deadline = time.monotonic() + 5
    while pool["a"].state is not ModelState.UNLOADED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool["a"].state is ModelState.UNLOADED
    threads = pool.threads
    assert threads
    pool.close()
    assert all(not t.is_alive() for t in threads)
    assert pool.threads == []
    with pytest.raises(ModelStateError, match="closed"):
        run(pool, "a")


def test_a_dropped_pool_and_its_models_die_without_the_garbage_collector() -> None:
    # Status pages list every live model: a closed pool kept alive by a cycle
    # (its prefetcher holding it back) listed its models twice until gc ran.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        with make_pool() as pool:
            model = pool.register("a", mlp, size_hint=SIZE)
            assert pool.prefetch("a").result() is True
            run(pool, "a")
        refs = weakref.ref(pool), weakref.ref(model)
        del pool, model
        assert [ref() for ref in refs] == [None, None]
    finally:
        if was_enabled:
            gc.enable()


def test_prefetch_loads_the_next_model_while_another_runs() -> None:
    gate = threading.Event()

    def slow() -> torch.nn.Module:
        gate.set()
        time.sleep(0.2)
        return TinyMLP(512)

    with make_pool() as pool:
        pool.register("a", mlp, size_hint=SIZE)
        pool.register("b", slow, size_hint=SIZE)
        with pool.use("a") as model:
            future = pool.prefetch("b")
            assert gate.wait(5)  # b is loading while a is in use
            model(torch.ones(1, 512))
        assert future.result(5) is True
        assert pool["b"].state is ModelState.READY
        run(pool, "b")
        assert pool["b"].stats.loads == 1  # warm: the lease used the prefetched load


def test_prefetch_without_room_loads_nothing() -> None:
    with make_pool("6MiB") as pool:
        pool.register("a", mlp, size_hint=SIZE)
        pool.register("b", mlp, size_hint=SIZE)
        with pool.use("a"):
            assert pool.prefetch("b").result(5) is False
        assert pool["b"].state is ModelState.UNLOADED


def test_out_of_memory_inside_a_lease_evicts_the_others_and_retries() -> None:
    attempts = []

    def infer(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        attempts.append(len(attempts))
        if len(attempts) == 1:
            torch.empty(1 << 60, dtype=torch.uint8)  # the real CPU allocator failure
        return model(x)

    with make_pool("20MiB") as pool:
        for name in "abc":
            pool.register(name, mlp, size_hint=SIZE)
        run(pool, "a")
        run(pool, "b")
        out = pool.call("c", infer, torch.ones(1, 512))
        assert out.shape == (1, 512)
        assert attempts == [0, 1]
        assert pool["a"].state is ModelState.UNLOADED
        assert pool["b"].state is ModelState.UNLOADED
        assert pool["c"].state is ModelState.READY


def test_call_retries_once_then_raises_the_error_itself(recorded: list[events.Event]) -> None:
    attempts = []

    def infer(model: torch.nn.Module) -> None:
        attempts.append(len(attempts))
        torch.empty(1 << 60, dtype=torch.uint8)

    with make_pool("20MiB") as pool:
        pool.register("c", mlp, size_hint=SIZE)
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            pool.call("c", infer)
        assert attempts == [0, 1]
        assert [e.model for e in recorded if e.kind == "oom"] == ["c"]  # one retry announced
        assert pool["c"].state is ModelState.READY


def test_oom_inside_a_lease_evicts_the_other_idle_models() -> None:
    with make_pool("20MiB") as pool:
        for name in "abc":
            pool.register(name, mlp, size_hint=SIZE)
        run(pool, "a")
        run(pool, "b")
        with pytest.raises(RuntimeError, match="can't allocate memory"), pool.use("c"):
            torch.empty(1 << 60, dtype=torch.uint8)  # the real CPU allocator failure
        assert pool["a"].state is ModelState.UNLOADED
        assert pool["b"].state is ModelState.UNLOADED
        assert pool["c"].state is ModelState.READY


def test_oom_inside_an_async_lease_evicts_the_other_idle_models() -> None:
    async def main(pool: ModelPool) -> None:
        async with pool.use("c"):
            torch.empty(1 << 60, dtype=torch.uint8)

    with make_pool("20MiB") as pool:
        for name in "abc":
            pool.register(name, mlp, size_hint=SIZE)
        run(pool, "a")
        run(pool, "b")
        with pytest.raises(RuntimeError, match="can't allocate memory"):
            asyncio.run(main(pool))
        assert pool["a"].state is ModelState.UNLOADED
        assert pool["b"].state is ModelState.UNLOADED
        assert pool["c"].state is ModelState.READY


def test_oom_retry_decorator_uses_the_pool() -> None:
    with make_pool("20MiB") as pool:
        pool.register("a", mlp, size_hint=SIZE)
        run(pool, "a")
        attempts = []

        @vramkit.oom_retry(pool=pool)
        def allocate() -> int:
            attempts.append(1)
            if len(attempts) == 1:
                torch.empty(1 << 60, dtype=torch.uint8)
            return len(attempts)

        assert allocate() == 2
        assert pool["a"].state is ModelState.UNLOADED


def test_status_lists_every_model() -> None:
    with make_pool() as pool:
        pool.register("asr", mlp, size_hint=SIZE, pin=True)
        pool.register("llm", mlp, size_hint=SIZE)
        run(pool, "asr")
        status = pool.status()
        assert [m.name for m in status.models] == ["asr", "llm"]
        assert status.models[0].state == "READY"
        assert status.models[0].pinned
        assert status.models[0].device_bytes == SIZE
        assert status.models[1].device_bytes == 0
        assert status.charged_bytes == SIZE
        assert status.budget_bytes == 10 * MiB
        text = str(pool)
        assert text.startswith("pool test on cpu:")
        assert "READY pinned" in text
        assert "pool test on cpu" in vramkit.status()


def test_budget_forms(tmp_path: Any) -> None:
    total = vramkit.snapshot("cpu")["cpu"].total_bytes or 0
    assert ModelPool("cpu", budget=0.5).budget_bytes() == int(total * 0.5)
    assert ModelPool("cpu", budget=1024).budget_bytes() == 1024
    free = ModelPool("cpu").budget_bytes()
    assert 0 < free <= total


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: ModelPool("cpu", budget="-1GiB"), InvalidArgumentError, "budget must be"),
        (lambda: ModelPool("cpu", budget=1.5), InvalidArgumentError, "fraction"),
        (lambda: ModelPool("cpu", budget=0), InvalidArgumentError, "more than 0"),
        (lambda: ModelPool("cpu", headroom="lots"), InvalidArgumentError, "headroom must be"),
        (lambda: ModelPool("cpu", timeout=-1), InvalidArgumentError, "timeout"),
        (lambda: ModelPool("cpu", evict_to="swap"), InvalidArgumentError, "evict_to"),
        (lambda: ModelPool("cpu", keep_alive=-3), InvalidArgumentError, "keep_alive"),
        (lambda: ModelPool("tpu"), InvalidArgumentError, "unknown device"),
        (lambda: ModelPool("cpu:1"), DeviceUnavailableError, "one cpu"),
    ],
)
def test_bad_input(make: Any, error: type, fragment: str) -> None:
    with pytest.raises(error) as info:
        make()
    assert fragment in str(info.value)


def test_membership_rules() -> None:
    with make_pool() as pool, make_pool() as other:
        model = pool.register("a", mlp)
        with pytest.raises(InvalidArgumentError, match="already in the pool"):
            pool.register("a", mlp)
        with pytest.raises(InvalidArgumentError, match="another pool"):
            other.add(model)
        with pytest.raises(InvalidArgumentError, match="model must be a ManagedModel"):
            pool.add("a")  # type: ignore[arg-type]
        with pytest.raises(KeyError, match="it has: a"):
            pool["zzz"]
        assert "a" in pool
        assert len(pool) == 1
        removed = pool.remove("a")
        assert removed.state is ModelState.UNLOADED
        assert "a" not in pool
        other.add(removed)  # free to join another pool now


def test_shrinking_the_budget_evicts_idle_models() -> None:
    with make_pool("20MiB") as pool:
        for name in "abc":
            pool.register(name, mlp, size_hint=SIZE)
            run(pool, name)
        with pool.use("c"):
            evicted = pool.set_budget("5MiB")
        assert sorted(evicted) == ["a", "b"]
        assert pool.status().budget_bytes == 5 * MiB
        with pytest.raises(InvalidArgumentError, match="budget"):
            pool.set_budget("-1")


def test_a_model_belongs_to_one_pool_at_a_time_and_follows_its_keep_alive() -> None:
    now = [0.0]
    first = make_pool("20MiB")
    second = ModelPool(
        "cpu", budget="20MiB", headroom=0, clock=lambda: now[0], start_threads=False, name="2nd"
    )
    try:
        model = first.register("m", mlp, size_hint=SIZE, keep_alive=5)
        with pytest.raises(InvalidArgumentError, match="already belongs to another pool"):
            second.add(model)
        first.remove("m")
        second.add(model)  # free to join once removed
        run(second, "m")
        now[0] += 6
        assert second.run_expiry() >= 1  # its keep-alive runs on its pool's clock now
        assert model.state is ModelState.UNLOADED
    finally:
        first.close()
        second.close()


def test_a_safetensors_header_gives_the_size_before_the_first_load(tmp_path: Any) -> None:
    from safetensors.torch import save_file

    from vramkit.adapters._checkpoint import checkpoint_bytes

    save_file({"w": torch.zeros(256, 256), "b": torch.zeros(256)}, str(tmp_path / "m.safetensors"))
    (tmp_path / "broken.safetensors").write_bytes(b"\xff" * 16)  # unreadable header: its size
    assert checkpoint_bytes({"path": str(tmp_path / "m.safetensors")}) == 4 * (256 * 256 + 256)
    assert checkpoint_bytes({"model": str(tmp_path)}) == 4 * (256 * 256 + 256) + 16


def test_evicting_a_model_already_in_the_chosen_tier_unloads_it() -> None:
    # On a cpu device the cpu tier frees nothing; offloading there again used
    # to change nothing, and the admission waited out its timeout.
    with make_pool("6MiB", evict_to="cpu") as pool:
        pool.register("a", mlp, size_hint=SIZE)
        pool.register("b", mlp, size_hint=SIZE)
        run(pool, "a")
        run(pool, "b")  # a: offloaded "in place", still counted, then unloaded
        assert pool["a"].state is ModelState.UNLOADED
        assert pool["b"].state is ModelState.READY
