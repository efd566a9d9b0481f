"""vramkit_multiplexed as one replica runs it, in this process (no cluster: seconds, not minutes).

A deployment class decorated for Serve is a plain class; its ``get_model`` works
outside a replica, minus the reports to Serve's controller, which are checked
here against a recording stand-in and for real in test_ray_serve_cluster.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("ray.serve")

import vramkit
from vramkit import (
    BudgetExceededError,
    InvalidArgumentError,
    ModelState,
    ModelStateError,
    UnknownModelError,
)
from vramkit.integrations import ray_serve
from vramkit.integrations.ray_serve import (
    FREE_BYTES_STAT,
    MultiplexedModels,
    rank_replicas_by_memory,
    vramkit_multiplexed,
)

pytestmark = pytest.mark.ray

MiB = 2**20
SIZES = {"a": 1, "b": 2, "c": 3, "d": 4}  # MiB


def build(model_id: str) -> torch.nn.Linear:
    """A model of exactly SIZES[model_id] MiB whose answer to ones(1, 256) names it."""
    layer = torch.nn.Linear(256, SIZES[model_id] * MiB // 4 // 256, bias=False)
    torch.nn.init.constant_(layer.weight, SIZES[model_id])
    return layer


def answer(model: torch.nn.Linear) -> float:
    with torch.inference_mode():
        return float(model(torch.ones(1, 256, device=model.weight.device))[0, 0])


def size_of(model_id: str) -> int:
    return SIZES[model_id] * MiB


def deployment(tmp_path: Path, load: Callable[[str], Any] = build, **options: Any) -> Any:
    """A deployment class as a user writes it, budgeted at 6 MiB on cpu."""
    settings: dict[str, Any] = {
        "budget": "6MiB",
        "device": "cpu",
        "headroom": 0,
        "evict_to": "disk",
        "size_hint": size_of,
        "offload_dir": tmp_path,
        **options,
    }

    class Models:
        def __init__(self) -> None:
            self.kept: list[Any] = []

        @vramkit_multiplexed(**settings)
        async def get_model(self, model_id: str) -> Any:
            return load(model_id)

        async def handle(self, model_id: str) -> float:
            return answer(await self.get_model(model_id))

    return Models()


def run(instance: Any, main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    """Run ``main`` on an event loop, then shut the replica's models down."""

    async def session() -> Any:
        try:
            return await main()
        finally:
            await instance.get_model.shutdown()

    return asyncio.run(session())


async def request(instance: Any, model_id: str) -> float:
    """One Serve request: its own task, so its borrow ends with it."""
    return float(await asyncio.create_task(instance.handle(model_id)))


# ------------------------------------------------------------------ the decorator


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"budget": "-1GiB"}, "budget"),
        ({"budget": True}, "budget"),
        ({"budget": [1]}, "budget"),
        ({"budget": 1.5}, "fraction"),
        ({"headroom": "lots"}, "headroom"),
        ({"device": 3.5}, "device"),
        ({"evict_to": "tape"}, "evict_to"),
        ({"keep_alive": -1}, "keep_alive"),
        ({"timeout": float("nan")}, "timeout"),
        ({"size_hint": 12}, "size_hint"),
        ({"max_num_models_per_replica": 3}, "budget= replaces max_num_models_per_replica"),
        ({"inference_mode": True}, "torch.inference_mode"),
        ({"name": "x"}, "model id is the name"),
    ],
)
def test_bad_arguments_fail_where_the_decorator_is_applied(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgumentError, match=message):
        vramkit_multiplexed(**options)


def test_the_loader_must_be_an_async_def_taking_the_model_id() -> None:
    def sync(self: Any, model_id: str) -> None: ...

    async def three(self: Any, model_id: str, extra: int) -> None: ...

    with pytest.raises(InvalidArgumentError, match="async def"):
        vramkit_multiplexed(sync)
    with pytest.raises(InvalidArgumentError, match="takes 3 parameters"):
        vramkit_multiplexed(three)


def test_a_model_id_must_be_a_non_empty_string(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        for bad in ("", 7, None):
            with pytest.raises(InvalidArgumentError, match="non-empty string"):
                await instance.get_model(bad)

    run(instance, main)


# ------------------------------------------------------------------ the budget


def test_models_are_admitted_by_size_and_evicted_to_a_tier_within_the_budget(
    tmp_path: Path,
) -> None:
    instance = deployment(tmp_path)
    order = list("abcdabcdba")

    async def main() -> list[float]:
        return [await request(instance, m) for m in order]

    answers = run(instance, lambda: main())
    assert answers == [SIZES[m] * 256.0 for m in order]  # weights survive the disk tier
    status = instance.get_model.status()
    assert status.pool.peak_charged_bytes <= 6 * MiB
    assert status.loads == 4  # one per id: every later miss woke from disk
    assert status.wakes > 0
    assert dict(status.evictions) == {"disk": status.pool.evictions}


def test_auto_eviction_picks_the_disk_when_loading_costs_more_than_waking(
    tmp_path: Path,
) -> None:
    def slow(model_id: str) -> torch.nn.Linear:
        time.sleep(0.2)  # stands for a download: a load costs far more than a wake
        return build(model_id)

    instance = deployment(tmp_path, slow, evict_to="auto")

    async def main() -> None:
        for model_id in "cdcd":
            await request(instance, model_id)

    run(instance, main)
    status = instance.get_model.status()
    assert status.loads == 2
    assert status.wakes == 2
    assert set(status.evictions) == {"disk"}


def test_a_borrowed_model_is_not_evicted_before_its_request_ends(tmp_path: Path) -> None:
    instance = deployment(tmp_path, timeout=0.5)

    async def main() -> None:
        release = asyncio.Event()

        async def long_request() -> None:
            await instance.get_model("d")  # 4 MiB, borrowed until this task ends
            await release.wait()

        holder = asyncio.create_task(long_request())
        pool = instance.get_model.pool
        while "d" not in pool or pool["d"].leases == 0:
            await asyncio.sleep(0.01)
        with pytest.raises(BudgetExceededError, match=r"d 4\.0 MiB \(1 leases\)"):
            await request(instance, "c")  # 3 MiB more would break the 6 MiB budget
        assert instance.get_model.pool["d"].state is ModelState.READY
        release.set()
        await holder
        assert await request(instance, "c") == 768.0  # room once the request ended

    run(instance, main)


def test_unload_waits_for_a_request_that_still_borrows_the_model(tmp_path: Path) -> None:
    instance = deployment(tmp_path)
    # One worker thread, so the thread that took the request's lease is surely
    # free again when the unload starts (with more, it usually is).
    instance.get_model._executor.shutdown()
    instance.get_model._executor = concurrent.futures.ThreadPoolExecutor(1)

    async def main() -> vramkit.UnloadReport:
        release = asyncio.Event()

        async def long_request() -> None:
            await instance.get_model("a")
            await release.wait()

        holder = asyncio.create_task(long_request())
        pool = instance.get_model.pool
        while "a" not in pool or pool["a"].leases == 0:
            await asyncio.sleep(0.01)
        unloading = asyncio.create_task(instance.get_model.unload("a"))
        deadline = time.monotonic() + 30
        while not unloading.done() and not pool["a"]._life.waiting:  # until it waits (or fails)
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        release.set()
        await holder
        return await unloading  # waited for the borrow, whichever thread took it

    assert run(instance, main).died


def test_use_borrows_a_model_for_a_block_only(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        async with instance.get_model.use("a") as model:
            assert answer(model) == 256.0
            assert instance.get_model.pool["a"].leases == 1
        assert instance.get_model.pool["a"].leases == 0

    run(instance, main)


@pytest.mark.cuda
def test_on_cuda_evicted_models_wait_in_host_ram_and_the_budget_holds(tmp_path: Path) -> None:
    def on_gpu(model_id: str) -> torch.nn.Linear:
        return build(model_id).to("cuda")

    instance = deployment(tmp_path, on_gpu, device="cuda", evict_to="auto")
    torch.cuda.synchronize()
    baseline = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    order = list("abcdabcd")

    async def main() -> list[float]:
        return [await request(instance, m) for m in order]

    assert run(instance, main) == [SIZES[m] * 256.0 for m in order]
    status = instance.get_model.status()
    assert status.loads == 4
    assert status.wakes > 0
    assert set(status.evictions) == {"cpu"}  # pinned host RAM wakes fastest
    # Weights never above the 6 MiB budget on the device; 1 MiB for inputs and outputs.
    assert torch.cuda.max_memory_allocated() - baseline <= 7 * MiB


# ------------------------------------------------------------------ concurrency


def test_loads_of_different_models_do_not_wait_for_each_other(tmp_path: Path) -> None:
    started = {m: threading.Event() for m in "ab"}

    def meeting(model_id: str) -> torch.nn.Linear:
        # Each load waits for the other to have started: loads that took turns
        # (one lock per replica, as in Ray's multiplexer) would time out here.
        started[model_id].set()
        other = "b" if model_id == "a" else "a"
        assert started[other].wait(timeout=30), f"{model_id} loaded alone"
        return build(model_id)

    instance = deployment(tmp_path, meeting)

    async def main() -> list[float]:
        return list(await asyncio.gather(request(instance, "a"), request(instance, "b")))

    assert run(instance, main) == [256.0, 512.0]


def test_concurrent_requests_for_one_model_load_it_once(tmp_path: Path) -> None:
    loads: list[str] = []

    def counted(model_id: str) -> torch.nn.Linear:
        loads.append(model_id)
        time.sleep(0.1)  # others arrive while this load runs
        return build(model_id)

    instance = deployment(tmp_path, counted)

    async def main() -> list[float]:
        return list(await asyncio.gather(*(request(instance, "b") for _ in range(6))))

    assert run(instance, main) == [512.0] * 6
    assert loads == ["b"]


def test_a_slow_load_does_not_block_the_event_loop(tmp_path: Path) -> None:
    loading = threading.Event()
    finish = threading.Event()

    def blocking(model_id: str) -> torch.nn.Linear:
        loading.set()
        assert finish.wait(timeout=30)
        return build(model_id)

    instance = deployment(tmp_path, blocking)

    async def main() -> float:
        pending = asyncio.create_task(request(instance, "a"))
        while not loading.is_set():
            await asyncio.sleep(0.01)
        await asyncio.sleep(0)  # the loop still runs other tasks while the loader blocks
        finish.set()
        return await pending

    assert run(instance, main) == 256.0


def test_the_pool_used_directly_from_a_coroutine_still_loads(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        await request(instance, "a")
        await asyncio.sleep(0)  # the request's borrow ends in a callback, after its awaiters
        model = instance.get_model.pool["a"]
        model.unload()
        model.load()  # on the event loop's own thread: the loader cannot wait for this loop
        assert model.state is ModelState.READY

    run(instance, main)
    assert instance.get_model.status().loads == 2


def test_a_request_cancelled_while_its_model_loads_leaves_no_lease_behind(
    tmp_path: Path,
) -> None:
    loading = threading.Event()
    finish = threading.Event()

    def blocking(model_id: str) -> torch.nn.Linear:
        loading.set()
        assert finish.wait(timeout=30)
        return build(model_id)

    instance = deployment(tmp_path, blocking)

    async def main() -> None:
        pending = asyncio.create_task(request(instance, "a"))
        while not loading.is_set():
            await asyncio.sleep(0.01)
        pending.cancel()  # the client went away
        with pytest.raises(asyncio.CancelledError):
            await pending
        finish.set()
        model = instance.get_model.pool["a"]
        deadline = time.monotonic() + 30
        while model.state is not ModelState.READY or model.leases:
            assert time.monotonic() < deadline, model
            await asyncio.sleep(0.01)
        model.unload()  # nobody holds it: no ModelBusyError

    try:
        asyncio.run(main())
    finally:
        if not instance.get_model.pool["a"].leases:  # a leaked lease would block close()
            instance.get_model.close()


# ------------------------------------------------------------------ failures


def test_an_unknown_model_id_fails_its_request_and_is_forgotten(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        with pytest.raises(KeyError, match="nope"):
            await request(instance, "nope")
        assert "nope" not in instance.get_model.pool
        assert await request(instance, "a") == 256.0

    run(instance, main)


def test_out_of_memory_while_loading_evicts_the_idle_models_and_retries_once(
    tmp_path: Path,
) -> None:
    attempts: list[str] = []

    def tight(model_id: str) -> torch.nn.Linear:
        attempts.append(model_id)
        if model_id == "b" and attempts.count("b") == 1:
            raise RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")
        return build(model_id)

    instance = deployment(tmp_path, tight)

    async def main() -> None:
        assert await request(instance, "a") == 256.0
        assert await request(instance, "b") == 512.0

    run(instance, main)
    assert attempts == ["a", "b", "b"]
    assert instance.get_model.status().evictions == {"disk": 1}


def test_out_of_memory_inside_a_request_evicts_the_other_idle_models(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        await request(instance, "a")
        with pytest.raises(torch.OutOfMemoryError):
            async with instance.get_model.use("b"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        assert instance.get_model.pool["a"].state is ModelState.OFFLOADED
        assert instance.get_model.pool["b"].state is ModelState.READY

    run(instance, main)


# ------------------------------------------------------------------ stray references


def test_a_stray_reference_is_named_in_the_serve_log_and_freed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    instance = deployment(tmp_path)

    async def careless_request() -> None:
        instance.kept.append(await instance.get_model("b"))

    async def main() -> vramkit.UnloadReport:
        await asyncio.create_task(careless_request())
        with caplog.at_level(logging.INFO, logger="ray.serve"):
            return await instance.get_model.unload("b")

    report = run(instance, main)
    assert not report.died
    assert report.neutralised_bytes >= 2 * MiB
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warning.name == "ray.serve"
    assert "model 'b' survived unloading: held by" in warning.getMessage()
    assert "Models.kept[0]" in warning.getMessage()
    with torch._C.DisableTorchFunctionSubclass():  # freed: the stale reference pins nothing
        assert instance.kept[0].weight.numel() == 0
    with pytest.raises(vramkit.ModelStateError, match="b was unloaded"):
        instance.kept[0].weight.sum()  # and says so at its next use
    assert instance.get_model.status().survivors == 1


# ------------------------------------------------------------------ status and reports


def test_status_says_what_each_replica_holds_and_what_it_cost(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        for model_id in "dcd":
            await request(instance, model_id)
        await instance.get_model.unload("c")

    run(instance, main)
    status = instance.get_model.status()
    data = json.loads(json.dumps(status.to_dict()))
    assert data["replica"] is None  # not in a Serve replica
    assert (data["loads"], data["wakes"]) == (2, 1)
    assert data["evictions"] == {"disk": 2}
    assert [m["name"] for m in data["pool"]["models"]] == ["d", "c"]
    assert "2 loads" in str(status)
    assert "1 wakes" in str(status)


def test_the_replica_reports_loaded_and_offloaded_models_but_not_unloaded_ones(
    tmp_path: Path,
) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        for model_id in "dc":  # c evicts d to disk: waking it here beats loading elsewhere
            await request(instance, model_id)
        assert instance.get_model.model_ids() == ["c", "d"]
        await instance.get_model.unload("d")
        assert instance.get_model.model_ids() == ["c"]
        stats = instance.get_model.routing_stats()
        assert stats[FREE_BYTES_STAT] == 3 * MiB
        assert stats["vramkit_budget_bytes"] == 6 * MiB

    run(instance, main)


@dataclasses.dataclass
class _FakeReplicaId:
    unique_id: str


@dataclasses.dataclass
class _FakeReplicaContext:
    replica_id: _FakeReplicaId
    deployment: str = "Models"
    replica_tag: str = "r1"


@pytest.fixture
def in_a_replica(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, list[str]]]:
    """Pretend to be a Serve replica; collect what would be reported to the controller.

    Serve's metrics are real: outside a cluster they record nothing, but they
    still check every call's tags.
    """
    pushed: list[tuple[Any, list[str]]] = []
    replica = _FakeReplicaId("r1")
    monkeypatch.setattr(ray_serve._models, "_replica_context", lambda: _FakeReplicaContext(replica))
    monkeypatch.setattr(
        ray_serve._models, "_report_to_serve", lambda r, ids: pushed.append((r, ids))
    )
    return pushed


def _eventually(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, "condition not met within 30 s"
        time.sleep(0.02)


def test_the_held_model_ids_are_reported_to_serve_when_they_change(
    tmp_path: Path, in_a_replica: list[tuple[Any, list[str]]]
) -> None:
    instance = deployment(tmp_path)

    async def wait_for(ids: list[str]) -> None:
        deadline = time.monotonic() + 30
        while not in_a_replica or in_a_replica[-1][1] != ids:
            assert time.monotonic() < deadline, in_a_replica
            await asyncio.sleep(0.02)

    async def main() -> None:
        await request(instance, "d")
        await wait_for(["d"])
        await request(instance, "c")  # evicts d to disk: still held here
        await wait_for(["c", "d"])
        await instance.get_model.unload("d")
        await wait_for(["c"])

    run(instance, main)
    assert [ids for _, ids in in_a_replica] == [["d"], ["c", "d"], ["c"]]
    assert {replica.unique_id for replica, _ in in_a_replica} == {"r1"}
    assert instance.get_model.pool.name == "Models#r1"


def test_metrics_take_every_kind_of_event_in_a_replica(
    tmp_path: Path, in_a_replica: list[tuple[Any, list[str]]]
) -> None:
    instance = deployment(tmp_path)

    async def careless() -> None:
        instance.kept.append(await instance.get_model("a"))

    async def main() -> None:
        for model_id in "dcd":  # loads, an eviction to disk, a wake
            await request(instance, model_id)
        await asyncio.create_task(careless())
        await instance.get_model.unload("a")  # a survivor
        await asyncio.sleep(0.3)  # a few report rounds: gauges per model id

    run(instance, main)
    status = instance.get_model.status()
    assert (status.loads, status.wakes, status.survivors) == (3, 1, 1)
    assert instance.get_model._reporter is None  # stopped at shutdown


def test_idle_models_unload_after_keep_alive(tmp_path: Path) -> None:
    instance = deployment(tmp_path, keep_alive=0)

    async def main() -> None:
        await request(instance, "a")
        model = instance.get_model.pool["a"]
        deadline = time.monotonic() + 30
        while model.state is not ModelState.UNLOADED:
            assert time.monotonic() < deadline, model
            await asyncio.sleep(0.02)
        assert instance.get_model.model_ids() == []
        assert await request(instance, "a") == 256.0  # and it loads again when asked

    run(instance, main)
    assert instance.get_model.status().loads == 2


def test_the_deployment_class_gets_record_routing_stats_unless_it_has_one(
    tmp_path: Path,
) -> None:
    instance = deployment(tmp_path)
    assert instance.record_routing_stats() == instance.get_model.routing_stats()

    class Own:
        def record_routing_stats(self) -> dict[str, Any]:
            return {"mine": 1}

        @vramkit_multiplexed(budget="1MiB", device="cpu")
        async def get_model(self, model_id: str) -> Any: ...

    assert Own().record_routing_stats() == {"mine": 1}
    instance.get_model.close()


def test_serve_finds_the_models_to_shut_down_with_the_replica(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        await request(instance, "a")
        # Ray Serve 2.60 awaits this attribute's shutdown() when a replica stops.
        await getattr(instance, "__serve_multiplex_wrapper").shutdown()
        assert instance.get_model.pool["a"].state is ModelState.UNLOADED
        assert instance.get_model.pool.closed
        with pytest.raises(ModelStateError, match="shut down"):
            await request(instance, "a")

    run(instance, main)  # and a second shutdown is harmless


def test_the_example_deployment_answers_from_its_model_store(tmp_path: Path) -> None:
    from examples.ray_serve_multiplex import app

    store = app.write_store(tmp_path / "store", ["tiny", "small"])
    expected = {}
    for model_id in ("tiny", "small"):
        model = app.load(store, model_id)
        with torch.inference_mode():
            expected[model_id] = float(model(torch.ones(1, model.dim)).sum())
    replica = app.Models.func_or_class(str(store))
    order = ["tiny", "small", "tiny"]

    async def main() -> list[dict[str, Any]]:
        return [await asyncio.create_task(replica.answer(m)) for m in order]

    answers = run(replica, main)
    assert [(a["model_id"], a["checksum"]) for a in answers] == [(m, expected[m]) for m in order]
    assert answers[-1]["loads"] == 2
    assert answers[-1]["pool"]["budget_bytes"] == app.BUDGET


def test_a_function_deployment_has_its_models_too(tmp_path: Path) -> None:
    @vramkit_multiplexed(budget="4MiB", device="cpu", headroom=0, offload_dir=tmp_path)
    async def get_model(model_id: str) -> torch.nn.Linear:
        return build(model_id)

    async def main() -> float:
        return answer(await asyncio.create_task(get_model("b")))

    try:
        assert asyncio.run(main()) == 512.0
    finally:
        models = get_model._standalone
        assert isinstance(models, MultiplexedModels)
        models.close()


def test_two_multiplexed_loaders_in_one_class_fail_clearly() -> None:
    class Twice:
        @vramkit_multiplexed(budget="1MiB", device="cpu")
        async def first(self, model_id: str) -> Any: ...

        @vramkit_multiplexed(budget="1MiB", device="cpu")
        async def second(self, model_id: str) -> Any: ...

    instance = Twice()
    models = instance.first
    with pytest.raises(InvalidArgumentError, match="one per deployment"):
        instance.second  # noqa: B018
    models.close()


def test_unload_of_an_id_never_seen_names_the_ones_held(tmp_path: Path) -> None:
    instance = deployment(tmp_path)

    async def main() -> None:
        await request(instance, "a")
        with pytest.raises(UnknownModelError, match="it has: a"):
            await instance.get_model.unload("zz")

    run(instance, main)


# ------------------------------------------------------------------ placement by memory


@dataclasses.dataclass(eq=False)
class Replica:
    name: str
    multiplexed_model_ids: set[str]
    routing_stats: dict[str, Any]


def _names(ranks: list[list[Replica]]) -> list[list[str]]:
    return [sorted(r.name for r in rank) for rank in ranks]


def test_replicas_holding_the_model_come_first_then_the_ones_with_most_room() -> None:
    full = Replica("full", {"a"}, {FREE_BYTES_STAT: 1 * MiB})
    roomy = Replica("roomy", {"b", "c"}, {FREE_BYTES_STAT: 5 * MiB})
    half = Replica("half", set(), {FREE_BYTES_STAT: 3 * MiB})
    twin = Replica("twin", set(), {FREE_BYTES_STAT: 3 * MiB})
    replicas = [full, roomy, half, twin]
    assert _names(rank_replicas_by_memory(replicas, "a")) == [
        ["full"],
        ["roomy"],
        ["half", "twin"],
    ]
    # A new id: most room first, not fewest models (that would be half or twin).
    assert _names(rank_replicas_by_memory(replicas, "new")) == [
        ["roomy"],
        ["half", "twin"],
        ["full"],
    ]


def test_a_replica_that_has_not_reported_counts_as_empty_and_no_id_goes_anywhere() -> None:
    fresh = Replica("fresh", set(), {})
    busy = Replica("busy", {"a"}, {FREE_BYTES_STAT: 7 * MiB})
    odd = Replica("odd", set(), {FREE_BYTES_STAT: "lots"})
    assert _names(rank_replicas_by_memory([busy, fresh, odd], "new")) == [
        ["fresh", "odd"],
        ["busy"],
    ]
    assert _names(rank_replicas_by_memory([busy, fresh], "")) == [["busy", "fresh"]]
    assert rank_replicas_by_memory([], "a") == []
