"""vramkit.controls: status, operations, the operation log and watch, over real pools on cpu."""

from __future__ import annotations

import dataclasses
import gc
import logging
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import vramkit
from vramkit import ManagedModel, ModelPool, ModelState, events
from vramkit.controls import (
    ACTIONS,
    OUTCOMES,
    Controls,
    Operation,
    OperationLog,
    live_watches,
    memory_line,
    watch,
)
from vramkit.devices import DeviceMemory
from vramkit.errors import InvalidArgumentError
from vramkit.testing.fake import FakeDevice
from vramkit.testing.models import module_nbytes, tiny_mlp

from .helpers import hold_lease

MiB = 1024**2


def mlp(mib: float = 2.0) -> torch.nn.Module:
    return tiny_mlp(mib)


@pytest.fixture(autouse=True)
def _no_publishing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VRAMKIT_PUBLISH", "0")


@pytest.fixture
def pool() -> Iterator[ModelPool]:
    with ModelPool("cpu", budget="256MiB", headroom=0, evict_to="unload", name="ctl") as p:
        # Size hints: a first load of unknown size would evict every idle model.
        p.register("asr", mlp, size_hint="2MiB")
        p.register("llm", lambda: mlp(4.0), pin=True, keep_alive=300, size_hint="4MiB")
        yield p


# ---------------------------------------------------------------------- status


def test_status_matches_pool_status_and_the_snapshot(pool: ModelPool) -> None:
    pool["asr"].load()
    loose = ManagedModel(lambda: mlp(1.0), name="loose", device="cpu")
    loose.load()
    status = Controls(pool, loose).status()
    expected = pool.status()

    assert [p["name"] for p in status["pools"]] == ["ctl"]
    line = status["pools"][0]
    for key in ("budget_bytes", "charged_bytes", "peak_charged_bytes", "loads", "evictions"):
        assert line[key] == getattr(expected, key), key
    by_name = {m["name"]: m for m in status["models"]}
    assert list(by_name) == ["asr", "llm", "loose"]
    for pooled in expected.models:
        entry = by_name[pooled.name]
        for key in ("state", "tier", "device_bytes", "size_bytes", "leases", "pinned"):
            assert entry[key] == getattr(pooled, key), (pooled.name, key)
        assert entry["keep_alive"] == pooled.keep_alive
        assert entry["pool"] == "ctl"
    assert by_name["llm"]["pinned"] is True
    assert by_name["loose"]["pool"] is None
    assert by_name["loose"]["device_bytes"] == loose.size_bytes == module_nbytes(mlp(1.0))

    (cpu,) = status["devices"]
    reading = vramkit.snapshot("cpu")["cpu"]
    assert cpu["device"] == "cpu"
    assert cpu["total_bytes"] == reading.total_bytes
    assert cpu["memory_line"].startswith("RAM: ")
    assert cpu["memory_line"].endswith("GiB (" + f"{cpu['used_fraction']:.0%})")
    assert set(cpu["capabilities"]) == set(ACTIONS)
    loose.close()


def test_status_without_targets_covers_every_live_pool_and_model(pool: ModelPool) -> None:
    loose = ManagedModel(lambda: mlp(1.0), name="stray", device="cpu")
    names = [m["name"] for m in Controls().status()["models"]]
    assert {"asr", "llm", "stray"} <= set(names)
    assert names.count("asr") == 1  # a pooled model is listed once, under its pool
    loose.close()


def test_memory_line_reads_like_the_webui() -> None:
    gpu = DeviceMemory("cuda:0", used_bytes=int(5.2 * 1024**3), total_bytes=16 * 1024**3)
    assert memory_line(gpu) == "GPU 0 Memory: 5.2 / 16.0 GiB (32%)"
    unknown = DeviceMemory("cuda:1", total_bytes=16 * 1024**3)
    assert memory_line(unknown) == "GPU 1 Memory: 16.0 GiB total, used unknown"
    assert memory_line(DeviceMemory("mps", used_bytes=1, total_bytes=4)).startswith("GPU Memory")


def test_capabilities_say_why_an_action_does_nothing() -> None:
    controls = Controls()
    cpu = controls.capabilities("cpu")
    assert "no allocator cache" in str(cpu["clear_cache"])
    assert "already lives in host RAM" in str(cpu["offload_cpu"])
    assert cpu["unload"] is None and cpu["offload_disk"] is None and cpu["free"] is None
    with FakeDevice(total="1GiB").install():
        assert set(controls.capabilities("fake:0").values()) == {None}
    with pytest.raises(InvalidArgumentError, match="unknown device"):
        controls.capabilities("tpu")


# ---------------------------------------------------------------------- operations


def test_unload_returns_the_bytes_a_snapshot_confirms(pool: ModelPool) -> None:
    model = pool.register("big", lambda: mlp(32.0))
    with model.use() as alive:
        ref = weakref.ref(alive)
    del alive
    size = model.size_bytes
    assert size is not None and size > 30 * MiB
    controls = Controls(pool)
    before = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    op = controls.unload("big", caller="ops")
    after = vramkit.snapshot("cpu")["cpu"].process_used_bytes
    assert op.outcome == "ok", op.message
    assert ref() is None
    assert model.state is ModelState.UNLOADED
    freed = op.freed_bytes["cpu"]["process"]
    assert freed is not None and freed >= 0.75 * size
    assert before is not None and after is not None and before - after >= 0.75 * size
    assert op.message.startswith("unloaded big: cpu ")
    assert "back (process)" in op.message
    assert op.caller == "ops" and op.model == "big" and op.action == "unload"
    assert list(controls.log) == [op]


def test_unload_of_a_leased_model_is_busy_names_the_holder_and_does_not_wait(
    pool: ModelPool,
) -> None:
    model = pool["asr"]
    release, thread = hold_lease(model)
    try:
        op = Controls(pool).unload("asr", caller="ops")
        assert op.outcome == "busy"
        assert "lease-holder" in op.message and "1 lease" in op.message
        assert op.detail["leases"] == 1
        assert model.state is ModelState.READY and model.leases == 1
        offload = Controls(pool).offload("asr", "disk")
        assert offload.outcome == "busy" and model.state is ModelState.READY
    finally:
        release.set()
        thread.join(30)


def test_unknown_and_ambiguous_names(pool: ModelPool) -> None:
    with ModelPool("cpu", budget="64MiB", headroom=0, name="other") as other:
        other.register("asr", mlp)
        controls = Controls(pool, other)
        missing = controls.wake("nope")
        assert missing.outcome == "not_found"
        assert missing.message == "no model named 'nope'; known: asr, llm"
        twice = controls.unload("asr")
        assert twice.outcome == "not_found"
        assert "ctl/asr, other/asr" in twice.message
        qualified = controls.wake("other/asr")
        assert qualified.outcome == "ok", qualified.message
        assert other["asr"].state is ModelState.READY
        assert pool["asr"].state is ModelState.UNLOADED


def test_offload_wake_and_noops(pool: ModelPool, tmp_path: Any) -> None:
    model = pool.register("tts", mlp, offload_dir=tmp_path)
    controls = Controls(pool)
    assert controls.offload("tts", "disk").outcome == "noop"  # not loaded yet
    assert controls.wake("tts").outcome == "ok"  # loads an unloaded model
    assert controls.wake("tts").outcome == "noop"
    cpu_tier = controls.offload("tts", "cpu")
    assert cpu_tier.outcome == "unsupported" and "host RAM" in cpu_tier.message
    assert model.state is ModelState.READY
    disk = controls.offload("tts", "disk")
    assert disk.outcome == "ok", disk.message
    assert model.state is ModelState.OFFLOADED and model.tier == "disk"
    assert disk.detail == {"tier": "disk", "method": "file"}
    assert controls.offload("tts", "disk").outcome == "noop"
    woke = controls.wake("tts")
    assert woke.outcome == "ok" and woke.message.startswith("woke tts from disk")
    assert model.state is ModelState.READY
    outcomes = [(op.action, op.outcome) for op in controls.log]
    assert outcomes == [
        ("offload", "noop"),
        ("wake", "ok"),
        ("wake", "noop"),
        ("offload", "unsupported"),
        ("offload", "ok"),
        ("offload", "noop"),
        ("wake", "ok"),
    ]


def test_free_evicts_idle_models_and_leaves_leased_ones(pool: ModelPool) -> None:
    loose = ManagedModel(lambda: mlp(1.0), name="loose", device="cpu")
    for name in ("asr", "llm"):
        pool[name].load()
    loose.load()
    release, thread = hold_lease(pool["llm"])
    try:
        op = Controls(pool, loose).free(caller="ops")
    finally:
        release.set()
        thread.join(30)
    assert op.outcome == "ok"
    assert sorted(op.detail["evicted"]) == ["asr", "loose"]
    assert op.detail["busy"] == {"llm": 1}
    assert "left in use: llm (1 leases)" in op.message
    assert pool["asr"].state is ModelState.UNLOADED
    assert loose.state is ModelState.UNLOADED
    assert pool["llm"].state is ModelState.READY
    loose.close()


def test_clear_cache_is_unsupported_on_cpu_and_clears_a_device_with_a_cache() -> None:
    with FakeDevice(total="1GiB").install() as fake:
        model = ManagedModel(lambda: mlp(1.0), name="fake-model", device="fake:0")
        fake.allocate("100MiB")
        fake.free("100MiB")  # 100 MiB stay cached
        controls = Controls(model)
        op = controls.clear_cache(caller="ops")
        assert op.outcome == "ok", op.message
        assert op.detail == {"devices": ["fake:0"]}
        assert fake.empty_cache_calls == 1
        assert op.freed_bytes["fake:0"]["reserved"] == 100 * MiB
        assert "fake:0 100.0 MiB back (reserved)" in op.message
        only_cpu = controls.clear_cache(device="cpu")
        assert only_cpu.outcome == "unsupported"
        assert fake.empty_cache_calls == 1
        model.close()


def test_a_failed_release_is_an_outcome_and_leaves_the_model_unloaded() -> None:
    def release(obj: object) -> None:
        raise RuntimeError("driver said no")

    model = ManagedModel(lambda: mlp(1.0), name="fragile", device="cpu", release=release)
    model.load()
    op = Controls(model).unload("fragile")
    assert op.outcome == "failed"
    assert "driver said no" in op.message
    assert model.state is ModelState.UNLOADED


def test_a_wake_with_no_room_is_an_outcome(tmp_path: Any) -> None:
    with ModelPool("cpu", budget="3MiB", headroom=0, timeout=0, name="tight") as tight:
        first = tight.register("first", mlp, offload_dir=tmp_path)
        tight.register("second", mlp)
        first.load()
        first.offload("disk")
        release, thread = hold_lease(tight["second"])
        try:
            op = Controls(tight).wake("first")
        finally:
            release.set()
            thread.join(30)
        assert op.outcome == "no_room", op.message
        assert "second" in op.message
        assert first.state is ModelState.OFFLOADED


def test_bad_input_fails_at_the_call(pool: ModelPool) -> None:
    with pytest.raises(InvalidArgumentError, match="argument 1 is 'asr'"):
        Controls(pool, "asr")  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="log must be an OperationLog"):
        Controls(log=[])  # type: ignore[arg-type]
    controls = Controls(pool)
    with pytest.raises(InvalidArgumentError, match="tier must be 'cpu' or 'disk'"):
        controls.offload("asr", "gpu")
    with pytest.raises(InvalidArgumentError, match="caller must be a string"):
        controls.free(caller=3)  # type: ignore[arg-type]
    with pytest.raises(InvalidArgumentError, match="name must be a model's name"):
        controls.unload("")
    with pytest.raises(InvalidArgumentError, match="maxlen"):
        OperationLog(maxlen=0)
    assert len(controls.log) == 0


def test_concurrent_operations_during_leases_lose_nothing(pool: ModelPool) -> None:
    controls = Controls(pool)
    errors: list[BaseException] = []
    stop = threading.Event()

    def lease_loop(name: str) -> None:
        try:
            while not stop.is_set():
                with pool.use(name) as model:
                    model(torch.ones(1, model.dim))
        except BaseException as exc:
            errors.append(exc)

    def control_loop(calls: list[Operation]) -> None:
        for i in range(8):
            name = ("asr", "llm")[i % 2]
            calls.append(controls.unload(name))
            calls.append(controls.wake(name))
            calls.append(controls.free())

    leasers = [threading.Thread(target=lease_loop, args=(n,)) for n in ("asr", "llm")]
    results: list[list[Operation]] = [[], []]
    callers = [threading.Thread(target=control_loop, args=(r,)) for r in results]
    for thread in leasers + callers:
        thread.start()
    for thread in callers:
        thread.join(120)
    stop.set()
    for thread in leasers:
        thread.join(30)
    assert not errors
    made = results[0] + results[1]
    assert len(made) == 48
    assert sorted(map(id, controls.log)) == sorted(map(id, made))
    assert {op.outcome for op in made} <= {"ok", "noop", "busy"}
    assert any(op.outcome == "busy" for op in made)
    for name in ("asr", "llm"):
        assert pool[name].state in (ModelState.READY, ModelState.UNLOADED)
        assert pool[name].leases == 0


# ---------------------------------------------------------------------- the log


def _operation(action: str = "free", outcome: str = "ok") -> Operation:
    snap = vramkit.snapshot("cpu")
    return Operation(action, outcome, "m", "me", None, 0.0, 0.0, snap, snap)


def test_the_log_is_bounded_thread_safe_and_observable(caplog: pytest.LogCaptureFixture) -> None:
    log = OperationLog(maxlen=50)
    seen: list[Operation] = []
    unsubscribe = log.subscribe(seen.append)

    def broken(op: Operation) -> None:
        raise ValueError("subscriber bug")

    log.subscribe(broken)
    with caplog.at_level(logging.INFO, logger="vramkit.controls"):
        threads = [
            threading.Thread(target=lambda: [log.append(_operation()) for _ in range(40)])
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert len(log) == 50 and log.maxlen == 50
    assert len(seen) == 160
    assert sum("subscriber bug" in (r.exc_text or "") for r in caplog.records) == 160
    assert sum(getattr(r, "vramkit_operation", None) is not None for r in caplog.records) == 160
    unsubscribe()
    unsubscribe()
    with caplog.at_level(logging.INFO, logger="vramkit.controls"):
        log.append(_operation(outcome="failed"))
    assert len(seen) == 160
    logged = [r for r in caplog.records if getattr(r, "vramkit_operation", None) is not None]
    assert logged[-1].levelno == logging.WARNING
    assert [d["outcome"] for d in log.to_list(limit=2)] == ["ok", "failed"]
    assert log.to_list(limit=0) == []
    with pytest.raises(InvalidArgumentError):
        log.append("op")  # type: ignore[arg-type]


def test_operation_to_dict_is_json_ready(pool: ModelPool) -> None:
    import json

    pool["asr"].load()
    op = Controls(pool).unload("asr", caller="ops")
    data = json.loads(json.dumps(op.to_dict()))
    assert data["outcome"] == "ok"
    assert data["freed_bytes"]["cpu"]["process"] == op.freed_bytes["cpu"]["process"]
    assert data["memory_before"]["devices"]["cpu"]["total_bytes"] > 0
    assert set(data) >= {"time", "caller", "action", "model", "message", "seconds", "detail"}
    assert str(op).endswith(f"ops unload asr: ok: {op.message}")
    assert set(OUTCOMES) >= {op.outcome}
    assert dataclasses.is_dataclass(op)


# ---------------------------------------------------------------------- watch


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def recorded() -> Iterator[list[events.Event]]:
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    yield seen
    unsubscribe()


def test_watch_alerts_once_per_crossing(
    recorded: list[events.Event], caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock()
    with FakeDevice(total="10GiB").install() as fake:
        w = watch(
            threshold=0.9, every=None, device="fake:0", check_every=5, clock=clock, start=False
        )
        with caplog.at_level(logging.INFO, logger="vramkit"), w:
            assert w.run_due() == 1  # the first check runs at once
            assert w.alerting == {"fake:0": False}
            fake.allocate("9GiB")
            assert w.run_due() == 0  # not due yet
            clock.now += 5
            assert w.run_due() == 1
            assert w.alerting == {"fake:0": True}
            clock.now += 5
            w.run_due()  # still above: no second alert
            fake.free("9GiB")
            fake.empty_cache(0)
            clock.now += 5
            w.run_due()
            assert w.alerting == {"fake:0": False}
            state = w.state()
        alerts = [e for e in recorded if e.kind == "threshold"]
        assert [(e.state_before, e.state_after) for e in alerts] == [
            ("below", "above"),
            ("above", "below"),
        ]
        assert alerts[0].detail["used_fraction"] == pytest.approx(0.9)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        line = "fake:0 memory: 9.0 / 10.0 GiB (90%)"
        assert f"[{line}: over the 90% threshold]" in warnings[0].message
        assert state["alerts"] == 1 and state["devices"]["fake:0"]["alerting"] is False
    assert w not in live_watches()


def test_watch_runs_its_action_on_a_timer_through_the_controls(pool: ModelPool) -> None:
    clock = Clock()
    controls = Controls(pool)
    pool["asr"].load()
    w = controls.watch(threshold=None, every="5min", action="free", clock=clock, start=False)
    try:
        assert w.state()["next_action_in_seconds"] == 300
        clock.now += 299
        assert w.run_due() == 0
        assert pool["asr"].state is ModelState.READY
        clock.now += 1
        assert w.run_due() == 1
        assert pool["asr"].state is ModelState.UNLOADED
        (op,) = list(controls.log)
        assert op.action == "free" and op.caller == "watch"
        state = w.state()
        assert state["actions_run"] == 1 and state["last_outcome"] == "ok"
        assert state["next_action_in_seconds"] == 300
        assert Controls(pool).status()["watches"][0]["name"] == "watch"
    finally:
        w.stop()
    assert Controls(pool).status()["watches"] == []


def test_watch_of_clear_cache_on_cpu_only_says_why_it_does_not_run() -> None:
    w = watch(threshold=0.99, device="cpu", start=False)
    try:
        state = w.state()
        assert state["action"] == "clear_cache"
        assert "no allocator cache" in state["action_disabled"]
        assert state["next_action_in_seconds"] is None
    finally:
        w.stop()


def test_watch_on_a_thread_checks_without_being_driven() -> None:
    with FakeDevice(total="1GiB").install() as fake:
        fake.allocate("1GiB")
        crossed = threading.Event()

        def seen(event: events.Event) -> None:
            if event.kind == "threshold" and event.device == "fake:0":
                crossed.set()

        unsubscribe = events.subscribe(seen)
        try:
            with watch(threshold=0.5, every=None, device="fake:0"):
                assert crossed.wait(30)
        finally:
            unsubscribe()


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"threshold": 1.5}, "threshold must be a fraction"),
        ({"threshold": True}, "threshold must be a fraction"),
        ({"every": "soon"}, "every must be a non-negative duration"),
        ({"every": 0}, "every must be more than 0"),
        ({"action": "reboot"}, "action must be 'clear_cache', 'free'"),
        ({"threshold": None, "every": None}, "needs a threshold"),
        ({"threshold": None, "action": None}, "needs a threshold"),
        ({"check_every": "0s"}, "check_every must be more than 0"),
        ({"controls": "all"}, "controls must be a Controls"),
        ({"name": ""}, "name must be a non-empty string"),
        ({"device": "tpu"}, "unknown device"),
    ],
)
def test_watch_bad_input(options: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        watch(start=False, **options)
    gc.collect()
    assert live_watches() == []
