"""ManagedModel with real torch modules: lazy loading, leases, reference-safe unloading."""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import threading
import time
import weakref
from typing import Any

import pytest
import torch

import vramkit
from vramkit import events
from vramkit.errors import (
    DeviceUnavailableError,
    InvalidArgumentError,
    ModelBusyError,
    ModelStateError,
    VramLeakError,
)
from vramkit.model import ManagedModel, ModelState, UnloadReport
from vramkit.testing.models import TinyMLP

MiB = 1024**2

# Module-level holders, so referrer chains have stable, recognisable roots.
registry: dict[str, Any] = {}
outputs: list[Any] = []


@pytest.fixture(autouse=True)
def _clear_holders() -> Any:
    yield
    registry.clear()
    outputs.clear()
    gc.collect()


def small(name: str = "mlp", **options: Any) -> ManagedModel[torch.nn.Module]:
    return ManagedModel.from_torch(lambda: TinyMLP(512), device="cpu", name=name, **options)


def width(module: Any) -> int:
    return int(module.dim)


# ---------------------------------------------------------------- lazy loading and leases


def test_nothing_loads_until_first_use() -> None:
    calls = []

    def loader() -> torch.nn.Module:
        calls.append(1)
        return torch.nn.Linear(4, 2)

    mm = ManagedModel(loader, name="lazy", device="cpu")
    assert mm.state is ModelState.UNLOADED
    assert calls == []
    with mm.use() as model:
        assert isinstance(model, torch.nn.Linear)
        assert mm.state is ModelState.READY
        assert mm.leases == 1
    assert mm.leases == 0
    assert calls == [1]
    with mm.use():
        pass
    assert calls == [1]  # loaded once
    assert mm.stats.loads == 1
    assert mm.stats.size_bytes == (4 * 2 + 2) * 4


def test_leases_run_under_inference_mode_unless_told_otherwise() -> None:
    mm = small()
    with mm.use() as model:
        assert torch.is_inference_mode_enabled()
        out = model(torch.ones(1, width(model)))
    assert not out.requires_grad
    raw = small("raw", inference_mode=False)
    with raw.use() as model:
        assert not torch.is_inference_mode_enabled()
        assert model(torch.ones(1, width(model))).requires_grad


def test_call_shortcut_and_inference_decorator() -> None:
    mm = small()
    x = torch.ones(2, 512)
    direct = mm(x)
    assert direct.shape == (2, 512)

    @mm.inference
    def predict(model: TinyMLP, inputs: torch.Tensor, *, double: bool = False) -> torch.Tensor:
        assert mm.leases == 1
        out = model(inputs)
        return out * 2 if double else out

    assert torch.equal(predict(x), direct)
    assert torch.equal(predict(x, double=True), direct * 2)
    assert mm.leases == 0
    assert predict.__name__ == "predict"


def test_inference_decorator_on_a_method_passes_self_first() -> None:
    mm = small()

    class Service:
        scale = 3.0

        @mm.inference
        def run(self, model: TinyMLP, x: torch.Tensor) -> torch.Tensor:
            assert isinstance(self, Service)
            return model(x) * self.scale

    x = torch.ones(1, 512)
    assert torch.equal(Service().run(x), mm(x) * 3.0)


def test_inference_decorator_with_options() -> None:
    mm = small()

    @mm.inference(inference_mode=False)
    def grad_enabled(model: TinyMLP) -> bool:
        return torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    assert grad_enabled() is True


def test_async_inference_function_takes_a_lease_per_call() -> None:
    mm = small()
    seen = []

    @mm.inference
    async def predict(model: TinyMLP, x: torch.Tensor) -> torch.Tensor:
        seen.append(mm.leases)
        await asyncio.sleep(0)
        return model(x)

    async def main() -> list[torch.Tensor]:
        return await asyncio.gather(*(predict(torch.ones(1, 512)) for _ in range(4)))

    results = asyncio.run(main())
    assert len(results) == 4
    assert max(seen) >= 1
    assert mm.leases == 0


def test_async_with_use() -> None:
    mm = small()

    async def main() -> int:
        async with mm.use() as model:
            return width(model)

    assert asyncio.run(main()) == 512


def test_calling_a_non_callable_model_says_so() -> None:
    mm = ManagedModel(lambda: {"weights": torch.zeros(4)}, name="dict", device="cpu")
    with pytest.raises(ModelStateError, match="not callable"):
        mm()
    assert mm.leases == 0


def test_concurrent_first_use_loads_once() -> None:
    loads = []
    gate = threading.Event()

    def slow_loader() -> torch.nn.Module:
        loads.append(threading.current_thread().name)
        gate.wait(1)
        return torch.nn.Linear(8, 8)

    mm = ManagedModel(slow_loader, name="slow", device="cpu")
    results: list[int] = []

    def worker() -> None:
        with mm.use() as model:
            results.append(id(model))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(0.05)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert len(loads) == 1
    assert len(set(results)) == 1
    assert len(results) == 8


# ---------------------------------------------------------------- unloading


def test_clean_unload_proves_death_and_returns_memory() -> None:
    mm = small()
    with mm.use() as model:
        ref = weakref.ref(model)
        weight = weakref.ref(model.layers[0].weight)
    del model
    report = mm.unload()
    assert isinstance(report, UnloadReport)
    assert report.died
    assert report.verified
    assert report.ok
    assert report.holders == ()
    assert ref() is None
    assert weight() is None
    assert mm.state is ModelState.UNLOADED
    assert report.state_before is ModelState.READY
    assert report.expected_bytes == mm.stats.size_bytes
    assert report.expected_bytes is not None
    assert report.expected_bytes >= 4 * MiB
    assert report.freed_bytes["allocated"] is None  # unknown on cpu, not 0
    assert "freed" in str(report)
    assert mm.stats.unloads == 1


def test_unloading_an_unloaded_model_is_a_no_op() -> None:
    report = small().unload()
    assert report.state_before is ModelState.UNLOADED
    assert "nothing to unload" in str(report)


def test_configuration_survives_unload_and_reload() -> None:
    settings = {"layers": 3}

    def build() -> torch.nn.Module:
        return TinyMLP(16, layers=settings["layers"])

    mm = ManagedModel.from_torch(build, device="cpu", name="configured")
    with mm.use() as model:
        assert len(model.layers) == 3
    mm.unload()
    with mm.use() as model:
        assert len(model.layers) == 3
    assert mm.stats.loads == 2


def _lease_in(mm: ManagedModel[Any], plant: Any) -> None:
    """Borrow the model in a function scope (no module-level `as` name) and plant a holder."""
    with mm.use() as model:
        plant(model)


def _closure(model: Any) -> None:
    def predict(x: torch.Tensor) -> torch.Tensor:
        return model(x)

    registry["predict"] = predict


def _grad_output(model: Any) -> None:
    with torch.inference_mode(False):  # the lease's inference mode is what prevents this
        outputs.append(model(torch.ones(1, width(model))))


def _traceback(model: Any) -> None:
    def failing(held: Any) -> None:
        raise ValueError("inference failed")

    try:
        failing(model)
    except ValueError as exc:
        outputs.append(exc)


class Container(torch.nn.Module):
    def __init__(self, sub: torch.nn.Module) -> None:
        super().__init__()
        self.sub = sub


class Handler:
    def __init__(self, model: Any) -> None:
        self.model = model

    def handle(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        pytest.param(
            _closure,
            "tests.test_model.registry['predict'] -> closure of "
            "_closure.<locals>.predict (variable 'model')",
            id="closure",
        ),
        pytest.param(lambda m: outputs.append(m), "tests.test_model.outputs[0]", id="global-list"),
        pytest.param(_grad_output, "tests.test_model.outputs[0] -> Tensor.grad_fn ->", id="grad"),
        pytest.param(
            _traceback,
            "tests.test_model.outputs[0] -> ValueError.__traceback__ -> "
            "traceback -> _traceback() in test_model.py",
            id="traceback",
        ),
        pytest.param(
            lambda m: registry.__setitem__("container", Container(m.layers[0])),
            "tests.test_model.registry['container'] -> Container.sub -> Linear.",
            id="submodule",
        ),
        pytest.param(
            lambda m: registry.__setitem__("handler", Handler(m).handle),
            "tests.test_model.registry['handler'] -> bound method Handler.handle -> Handler.model",
            id="bound-method",
        ),
    ],
)
def test_each_leak_pattern_is_named_and_freed(plant: Any, expected: str) -> None:
    mm = small("leaky")
    _lease_in(mm, plant)
    report = mm.unload()
    assert not report.died
    assert report.verified
    chains = [str(c) for c in report.holders]
    assert any(c.startswith(expected) for c in chains), chains
    assert report.neutralised_bytes >= MiB  # a whole model, or the one layer held
    assert "HELD" in str(report)
    # Whatever still holds model or weights now pins nothing: no weight storage left.
    leftovers = [
        t for t in vramkit.live_tensors("cpu") if t.nbytes >= MiB and t.shape == (512, 512)
    ]
    assert leftovers == []


def test_a_stale_module_reference_fails_loudly() -> None:
    mm = small("stale")
    _lease_in(mm, _closure)
    mm.unload()
    with pytest.raises(ModelStateError, match=r"stale was unloaded by vramkit .* `stale\.use\(\)`"):
        registry["predict"](torch.ones(1, 512))


def test_a_stale_graph_fails_backward_instead_of_reading_freed_memory() -> None:
    mm = small("graph")
    _lease_in(mm, _grad_output)
    mm.unload()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        outputs[0].sum().backward()


def test_strict_unload_raises_with_the_report() -> None:
    mm = small("strict", strict=True)
    _lease_in(mm, lambda m: outputs.append(m))
    with pytest.raises(VramLeakError, match=r"strict survived unloading") as info:
        mm.unload()
    assert isinstance(info.value, AssertionError)
    report = info.value.report  # type: ignore[attr-defined]
    assert "tests.test_model.outputs[0]" in str(report.holders[0])
    assert mm.state is ModelState.UNLOADED


def test_free_survivors_false_leaves_them_alone() -> None:
    mm = small("keep", free_survivors=False)
    _lease_in(mm, lambda m: outputs.append(m))
    report = mm.unload()
    assert not report.died
    assert report.neutralised_bytes == 0
    assert outputs[0](torch.ones(1, 512)).shape == (1, 512)  # still usable, still pinned


# ---------------------------------------------------------------- busy, waits, faults


def _hold_lease(mm: ManagedModel[Any], taken: threading.Event, release: threading.Event) -> None:
    with mm.use():
        taken.set()
        release.wait(5)


def test_unload_during_a_lease_in_another_thread_is_busy() -> None:
    mm = small("busy")
    taken, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_hold_lease, args=(mm, taken, release), name="worker-1")
    worker.start()
    taken.wait(5)
    time.sleep(0.05)
    with pytest.raises(
        ModelBusyError,
        match=r"has 1 lease out \(in use for 0\.\d s, the oldest taken by "
        r"thread 'worker-1'\)",
    ):
        mm.unload()
    assert mm.state is ModelState.READY
    with pytest.raises(ModelBusyError, match=r"waited 0.05 s"):
        mm.unload(timeout=0.05)
    release.set()
    worker.join(5)
    assert mm.unload().died


def test_unload_wait_returns_right_after_the_lease_ends() -> None:
    mm = small("wait")
    taken, release = threading.Event(), threading.Event()
    worker = threading.Thread(target=_hold_lease, args=(mm, taken, release))
    worker.start()
    taken.wait(5)
    released_at: list[float] = []

    def end_the_lease() -> None:
        released_at.append(time.monotonic())
        release.set()

    threading.Timer(0.2, end_the_lease).start()
    report = mm.unload(wait=True)
    returned_at = time.monotonic()
    assert report.died
    # It waited for the lease to end; how promptly it returned after is the
    # benchmark's business (a test cannot bound wall time on a busy host).
    assert released_at
    assert returned_at >= released_at[0]
    assert report.waited_seconds > 0
    worker.join(5)


@pytest.mark.timeout(120)
def test_unload_from_inside_its_own_lease_raises_at_once() -> None:
    mm = small("reentrant")
    # wait=True without a timeout: waiting here would deadlock, and
    # pytest-timeout would fail the test.
    with mm.use(), pytest.raises(ModelBusyError, match="inside its own lease"):
        mm.unload(wait=True)
    assert mm.unload().died


def test_a_failing_loader_leaves_the_model_unloaded_and_leaks_nothing() -> None:
    built: list[weakref.ref[torch.nn.Module]] = []
    attempts = []

    def loader() -> torch.nn.Module:
        module = TinyMLP(256)
        built.append(weakref.ref(module))
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("checkpoint unreadable")
        return module

    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        mm = ManagedModel(loader, name="flaky", device="cpu")
        with pytest.raises(OSError, match="checkpoint unreadable"), mm.use():
            pass
    finally:
        unsubscribe()
    assert mm.state is ModelState.UNLOADED
    assert mm.leases == 0
    gc.collect()
    assert built[0]() is None  # the half-built module did not survive in the traceback
    assert [e.kind for e in seen] == ["load_failed"]
    assert "checkpoint unreadable" in seen[0].detail["error"]
    with mm.use() as model:  # the configuration is intact: a retry loads
        assert isinstance(model, TinyMLP)


def test_a_failing_release_still_unloads_and_says_so() -> None:
    def bad_release(obj: Any) -> None:
        raise RuntimeError("driver said no")

    mm = ManagedModel(lambda: TinyMLP(64), name="badrelease", device="cpu", release=bad_release)
    with mm.use():
        pass
    with pytest.raises(ModelStateError, match="releasing the model failed") as info:
        mm.unload()
    assert mm.state is ModelState.UNLOADED
    assert info.value.report.died  # type: ignore[attr-defined]


def test_generic_adapter_release_and_size_are_used() -> None:
    released = []

    class Handle:
        def close(self) -> None:
            released.append(True)

    mm = ManagedModel(
        Handle, name="handle", device="cpu", release=lambda h: h.close(), size=lambda h: 123
    )
    with mm.use():
        pass
    assert mm.size_bytes == 123
    assert mm.unload().died
    assert released == [True]


def test_closed_model_refuses_use() -> None:
    with small("closing") as mm:
        mm(torch.ones(1, 512))
    assert mm.closed
    assert mm.state is ModelState.UNLOADED
    with pytest.raises(ModelStateError, match="closed"):
        mm.use().__enter__()


# ---------------------------------------------------------------- keep-alive, events, logs


def test_keep_alive_zero_unloads_when_the_last_lease_ends() -> None:
    mm = small("eager", keep_alive=0)
    mm(torch.ones(1, 512))
    deadline = time.monotonic() + 60  # a bound against hanging, not a speed check
    while mm.state is not ModelState.UNLOADED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mm.state is ModelState.UNLOADED


def test_keep_alive_expiry_with_a_controlled_clock() -> None:
    # A pool takes a clock and runs expiry when asked: the model's keep-alive, tested in time.
    now = [100.0]
    with vramkit.ModelPool(
        "cpu", budget="1GiB", headroom=0, clock=lambda: now[0], start_threads=False
    ) as pool:
        mm = pool.add(small("timed", keep_alive=30))
        mm(torch.ones(1, 512))
        now[0] += 29
        assert pool.run_expiry() == 0
        assert mm.state is ModelState.READY
        mm(torch.ones(1, 512))  # used again: the first expiry is stale
        now[0] += 29
        pool.run_expiry()
        assert mm.state is ModelState.READY
        now[0] += 2
        pool.run_expiry()
        assert mm.state is ModelState.UNLOADED


def test_events_and_logs_record_every_transition(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[events.Event] = []
    unsubscribe = events.subscribe(seen.append)
    try:
        with caplog.at_level(logging.INFO, logger="vramkit"):
            mm = small("logged")
            mm(torch.ones(1, 512))
            mm.unload()
    finally:
        unsubscribe()
    kinds = [(e.kind, e.model, e.state_before, e.state_after) for e in seen]
    assert kinds == [
        ("load", "logged", "UNLOADED", "READY"),
        ("unload", "logged", "READY", "UNLOADED"),
    ]
    assert seen[0].bytes == mm.stats.size_bytes
    assert seen[0].memory_before is not None
    assert seen[0].memory_after is not None
    assert seen[0].seconds > 0
    messages = [r.getMessage() for r in caplog.records if r.name == "vramkit"]
    assert any(m.startswith("load logged on cpu: UNLOADED -> READY") for m in messages)
    assert any(m.startswith("unload logged on cpu: READY -> UNLOADED") for m in messages)
    assert seen[0].to_dict()["kind"] == "load"


kept_by_test: list[Any] = []


def test_the_unload_event_names_who_kept_the_model() -> None:
    seen: list[events.Event] = []
    mm = small("kept")
    with mm.use() as model:
        kept_by_test.append(model.layers[0])
    unsubscribe = events.subscribe(seen.append)
    try:
        mm.unload()
    finally:
        unsubscribe()
        kept_by_test.clear()
    (unload,) = [e for e in seen if e.kind == "unload"]
    assert unload.detail["died"] is False
    assert any("kept_by_test[0]" in chain for chain in unload.detail["held_by"])
    assert unload.detail["neutralised_bytes"] >= 512 * 512 * 4


def test_a_holder_held_only_by_native_code_is_still_named() -> None:
    # Ray keeps a deployment instance alive from C++ only: no Python root above it.
    class Deployment:
        def __init__(self) -> None:
            self.kept: list[Any] = []

    deployment = Deployment()
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(deployment))
    alive = weakref.ref(deployment)  # weak references are not referrers
    mm = small("native")
    with mm.use() as model:
        deployment.kept.append(model)
    del deployment, model
    try:
        report = mm.unload()
    finally:
        ctypes.pythonapi.Py_DecRef(ctypes.py_object(alive()))
    assert not report.died
    assert [str(chain) for chain in report.holders] == ["... -> Deployment.kept[0]"]


def test_a_holder_frozen_by_gc_freeze_is_still_named() -> None:
    # Servers freeze the gc after startup (Ray Serve replicas do): what a deployment
    # made in __init__ is then invisible to gc.get_referrers.
    kept: dict[str, Any] = {"cache": []}
    frozen_before = gc.get_freeze_count()
    gc.freeze()
    try:
        mm = small("frozen")
        with mm.use() as model:
            kept["cache"].append(model)
        del model
        report = mm.unload()
        assert gc.get_freeze_count() > frozen_before  # the server's freeze is back in place
    finally:
        gc.unfreeze()
    assert not report.died
    assert any("kept['cache'][0]" in str(chain) for chain in report.holders), report


def test_a_failing_subscriber_does_not_break_loading(caplog: pytest.LogCaptureFixture) -> None:
    def broken(event: events.Event) -> None:
        raise RuntimeError("subscriber bug")

    unsubscribe = events.subscribe(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="vramkit"):
            small("robust")(torch.ones(1, 512))
    finally:
        unsubscribe()
    assert "subscriber" in caplog.text


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make", "error", "fragment"),
    [
        (lambda: ManagedModel(42, name="x"), InvalidArgumentError, "zero-argument callable"),
        (lambda: ManagedModel(dict, name=""), InvalidArgumentError, "non-empty string"),
        (lambda: ManagedModel(dict, device="tpu"), InvalidArgumentError, "unknown device 'tpu'"),
        (lambda: ManagedModel(dict, device="cpu:3"), DeviceUnavailableError, "one cpu"),
        (lambda: ManagedModel(dict, keep_alive=-1), InvalidArgumentError, "keep_alive must be"),
        (lambda: ManagedModel(dict, keep_alive="5m"), InvalidArgumentError, "keep_alive must be"),
        (lambda: ManagedModel(dict, driver_wait=-1), InvalidArgumentError, "driver_wait"),
        (
            lambda: ManagedModel(dict, release=print, adapter=object()),
            InvalidArgumentError,
            "either adapter= or release=",
        ),
        (lambda: ManagedModel(dict, release=3), InvalidArgumentError, "release must be a callable"),
        (
            lambda: ManagedModel.from_torch(torch.nn.Linear(2, 2)),
            InvalidArgumentError,
            "not the module itself",
        ),
        (
            lambda: ManagedModel.from_torch(lambda: 3, device="cpu").load(),
            InvalidArgumentError,
            "must return a torch.nn.Module; got int",
        ),
        (
            lambda: ManagedModel.from_torch(dict, dtype="half"),
            InvalidArgumentError,
            "dtype must be a torch.dtype",
        ),
        (lambda: small().unload(timeout=-1), InvalidArgumentError, "timeout must be"),
    ],
)
def test_bad_input_fails_at_the_call(make: Any, error: type, fragment: str) -> None:
    with pytest.raises(error, match=None) as info:
        make()
    assert fragment in str(info.value)


def test_timedelta_keep_alive() -> None:
    import datetime

    assert ManagedModel(dict, keep_alive=datetime.timedelta(minutes=5)).keep_alive == 300.0


def test_repr_and_properties() -> None:
    mm = small("shown")
    assert repr(mm) == "<ManagedModel 'shown' UNLOADED on cpu, ?, 0 leases>"
    mm.load()
    assert "READY on cpu, 4.0 MiB, 0 leases" in repr(mm)
    assert mm.is_loaded
    assert mm.idle_seconds is not None
    assert mm.config["factory"].endswith("<lambda>")
    assert mm.load() is None  # already loaded
