"""Every public entry point called wrongly gets a vramkit error that says what was expected.

Plus re-entrant misuse (unloading a model from inside its own lease must raise
at once, not deadlock), closed pools, and property-based tests of unit parsing
and of the model's state machine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import vramkit
from vramkit import ManagedModel, ModelPool, ModelState, VramkitError
from vramkit.errors import (
    DeviceUnavailableError,
    InvalidArgumentError,
    ModelBusyError,
    ModelStateError,
    UnknownModelError,
)
from vramkit.testing.models import TinyMLP

from .conftest import Record, scale


def tiny() -> torch.nn.Module:
    return TinyMLP(16)


def loaded() -> ManagedModel[Any]:
    mm = ManagedModel(tiny, name="m", device="cpu")
    mm.load()
    return mm


def closed_pool() -> ModelPool:
    pool = ModelPool("cpu", budget="1GiB", name="closed")
    pool.register("m", tiny)
    pool.close()
    return pool


# (what is called, the call, the error expected, a fragment of the message saying what was expected)
CASES: list[tuple[str, Callable[[], Any], type[BaseException], str]] = [
    ("parse_bytes('ten')", lambda: vramkit.parse_bytes("ten"), InvalidArgumentError, "'16MiB'"),
    ("parse_bytes(-1)", lambda: vramkit.parse_bytes(-1), InvalidArgumentError, "non-negative"),
    ("parse_bytes('10G')", lambda: vramkit.parse_bytes("10G"), InvalidArgumentError, "ambiguous"),
    (
        "parse_bytes(nan)",
        lambda: vramkit.parse_bytes(float("nan")),
        InvalidArgumentError,
        "'16MiB'",
    ),
    ("parse_bytes(None)", lambda: vramkit.parse_bytes(None), InvalidArgumentError, "'16MiB'"),  # type: ignore[arg-type]
    (
        "resolve_device('tpu')",
        lambda: vramkit.resolve_device("tpu"),
        InvalidArgumentError,
        "known kinds",
    ),
    (
        "resolve_device('cpu:3')",
        lambda: vramkit.resolve_device("cpu:3"),
        DeviceUnavailableError,
        "one cpu",
    ),
    (
        "resolve_device('cuda:-1')",
        lambda: vramkit.resolve_device("cuda:-1"),
        InvalidArgumentError,
        ">= 0",
    ),
    (
        "resolve_device(2.5)",
        lambda: vramkit.resolve_device(2.5),
        InvalidArgumentError,  # type: ignore[arg-type]
        "'cuda:1'",
    ),
    ("snapshot('gpu')", lambda: vramkit.snapshot("gpu"), InvalidArgumentError, "known kinds"),
    ("snapshot([])", lambda: vramkit.snapshot([]), InvalidArgumentError, "at least one device"),
    ("cleanup('npu')", lambda: vramkit.cleanup("npu"), InvalidArgumentError, "known kinds"),
    (
        "live_tensors('cpu:9')",
        lambda: vramkit.live_tensors("cpu:9"),
        DeviceUnavailableError,
        "one cpu",
    ),
    (
        "ManagedModel(None)",
        lambda: ManagedModel(None),
        InvalidArgumentError,  # type: ignore[arg-type]
        "zero-argument callable",
    ),
    (
        "ManagedModel(keep_alive=-1)",
        lambda: ManagedModel(tiny, keep_alive=-1),
        InvalidArgumentError,
        ">= 0 seconds",
    ),
    (
        "ManagedModel(keep_alive='5m')",
        lambda: ManagedModel(tiny, keep_alive="5m"),  # type: ignore[arg-type]
        InvalidArgumentError,
        "seconds >= 0",
    ),
    (
        "ManagedModel(size_hint='big')",
        lambda: ManagedModel(tiny, size_hint="big"),
        InvalidArgumentError,
        "size_hint must be",
    ),
    (
        "ManagedModel(device='cuda:99')",
        lambda: ManagedModel(tiny, device="cuda:99"),
        DeviceUnavailableError,
        "not available",
    ),
    (
        "from_torch(module)",
        lambda: ManagedModel.from_torch(torch.nn.Linear(1, 1)),
        InvalidArgumentError,
        "factory",
    ),
    (
        "from_onnx('missing.onnx')",
        lambda: ManagedModel.from_onnx("missing.onnx"),
        InvalidArgumentError,
        "does not exist",
    ),
    (
        "from_funasr('./missing')",
        lambda: ManagedModel.from_funasr("./missing"),
        InvalidArgumentError,
        "does not exist",
    ),
    (
        "unload(timeout=-1)",
        lambda: loaded().unload(timeout=-1),
        InvalidArgumentError,
        "timeout must be",
    ),
    ("offload('gpu')", lambda: loaded().offload("gpu"), InvalidArgumentError, "'cpu' or 'disk'"),
    (
        "offload() when unloaded",
        lambda: ManagedModel(tiny).offload("cpu"),
        ModelStateError,
        "not loaded",
    ),
    (
        "inference(3)",
        lambda: loaded().inference(3),
        InvalidArgumentError,  # type: ignore[call-overload]
        "decorates a function",
    ),
    (
        "events.subscribe(3)",
        lambda: vramkit.events.subscribe(3),
        InvalidArgumentError,  # type: ignore[arg-type]
        "callable",
    ),
    (
        "ModelPool(budget='-1GiB')",
        lambda: ModelPool("cpu", budget="-1GiB"),
        InvalidArgumentError,
        "budget must be",
    ),
    ("ModelPool(budget=2.0)", lambda: ModelPool("cpu", budget=2.0), InvalidArgumentError, "(0, 1]"),
    (
        "ModelPool(headroom='x')",
        lambda: ModelPool("cpu", headroom="x"),
        InvalidArgumentError,
        "headroom must be",
    ),
    (
        "ModelPool(evict_to='swap')",
        lambda: ModelPool("cpu", evict_to="swap"),  # type: ignore[arg-type]
        InvalidArgumentError,
        "'auto', 'cpu', 'disk' or 'unload'",
    ),
    (
        "pool['missing']",
        lambda: ModelPool("cpu", budget="1GiB")["missing"],
        UnknownModelError,
        "it has: none",
    ),
    (
        "pool.plan(['missing'])",
        lambda: ModelPool("cpu", budget="1GiB").plan(["missing"]),
        InvalidArgumentError,
        "not in the pool",
    ),
    ("closed pool.register", lambda: closed_pool().register("n", tiny), ModelStateError, "closed"),
    ("closed pool.use", lambda: closed_pool().use("m").__enter__(), ModelStateError, "closed"),
    ("closed pool.prefetch", lambda: closed_pool().prefetch("m"), ModelStateError, "closed"),
    ("closed pool.set_budget", lambda: closed_pool().set_budget("1GiB"), ModelStateError, "closed"),
    (
        "gpu_session(tolerance='ten')",
        lambda: vramkit.gpu_session(tolerance="ten"),
        InvalidArgumentError,
        "tolerance",
    ),
    (
        "gpu_session(leak_check='maybe')",
        lambda: vramkit.gpu_session(leak_check="maybe"),  # type: ignore[arg-type]
        InvalidArgumentError,
        "leak_check",
    ),
    (
        "oom_retry(retries=-1)",
        lambda: vramkit.oom_retry(retries=-1),
        InvalidArgumentError,
        "retries",
    ),
    (
        "adaptive_batch_size(0)",
        lambda: vramkit.adaptive_batch_size(0),
        InvalidArgumentError,
        "start",
    ),
    (
        "CleanupPolicy(every_calls=0)",
        lambda: vramkit.CleanupPolicy(every_calls=0),
        InvalidArgumentError,
        "every_calls",
    ),
    # Round 2: what a careless caller got through before.
    (
        "from_onnx(providers=[1])",
        lambda: ManagedModel.from_onnx(__file__, providers=[1]),
        InvalidArgumentError,
        "providers must be",
    ),
    (
        "from_funasr(None)",
        lambda: ManagedModel.from_funasr(None),  # type: ignore[arg-type]
        InvalidArgumentError,
        "model must be",
    ),
    (
        "ModelPool(clock=5)",
        lambda: ModelPool("cpu", clock=5),
        InvalidArgumentError,
        "clock must be",
    ),  # type: ignore[arg-type]
    ("pool.add(5)", lambda: ModelPool("cpu").add(5), InvalidArgumentError, "model must be"),  # type: ignore[arg-type]
    (
        "parse_bytes(what=5)",
        lambda: vramkit.parse_bytes(1, what=5),
        InvalidArgumentError,
        "what must be",
    ),  # type: ignore[arg-type]
    (
        "parse_bytes(Arabic-Indic digits)",
        lambda: vramkit.parse_bytes("\u0661\u0662MiB"),
        InvalidArgumentError,
        "'16MiB'",
    ),
    (
        "parse_bytes('1e99GiB')",
        lambda: vramkit.parse_bytes("1e99GiB"),
        InvalidArgumentError,
        "too large",
    ),
    ("parse_bytes(2**70)", lambda: vramkit.parse_bytes(2**70), InvalidArgumentError, "too large"),
    (
        "format_bytes(nan)",
        lambda: vramkit.format_bytes(math.nan),
        InvalidArgumentError,
        "value must be",
    ),
    (
        "format_bytes('1GiB')",
        lambda: vramkit.format_bytes("1GiB"),
        InvalidArgumentError,
        "value must be",
    ),  # type: ignore[arg-type]
    (
        "format_bytes(precision=-1)",
        lambda: vramkit.format_bytes(1, precision=-1),
        InvalidArgumentError,
        "precision",
    ),
    (
        "format_bytes(signed='no')",
        lambda: vramkit.format_bytes(1, signed="no"),
        InvalidArgumentError,
        "signed must be True or False",
    ),  # type: ignore[arg-type]
    (
        "resolve_device(' cpu')",
        lambda: vramkit.resolve_device(" cpu"),
        InvalidArgumentError,
        "device",
    ),
    (
        "resolve_device('CPU')",
        lambda: vramkit.resolve_device("CPU"),
        InvalidArgumentError,
        "lower case",
    ),
    (
        "resolve_device('cpu:00')",
        lambda: vramkit.resolve_device("cpu:00"),
        InvalidArgumentError,
        "leading zero",
    ),
    (
        "resolve_device(Arabic-Indic index)",
        lambda: vramkit.resolve_device("cuda:\u0660"),
        InvalidArgumentError,
        "device",
    ),
    (
        "cleanup(gc_collect='false')",
        lambda: vramkit.cleanup("cpu", gc_collect="false"),
        InvalidArgumentError,
        "gc_collect must be True or False",
    ),  # type: ignore[arg-type]
    (
        "cleanup(trim=1)",
        lambda: vramkit.cleanup("cpu", trim=1),
        InvalidArgumentError,
        "trim must be True or False",
    ),  # type: ignore[arg-type]
    (
        "gpu_session(cleanup='false')",
        lambda: vramkit.gpu_session(cleanup="false"),
        InvalidArgumentError,
        "cleanup must be True or False",
    ),  # type: ignore[call-overload]
    (
        "ManagedModel(strict='false')",
        lambda: ManagedModel(tiny, strict="false"),
        InvalidArgumentError,
        "strict must be True or False",
    ),  # type: ignore[arg-type]
    (
        "ManagedModel(inference_mode='no')",
        lambda: ManagedModel(tiny, inference_mode="no"),
        InvalidArgumentError,
        "inference_mode must be True or False",
    ),  # type: ignore[arg-type]
    (
        "ManagedModel(free_survivors=None)",
        lambda: ManagedModel(tiny, free_survivors=None),
        InvalidArgumentError,
        "free_survivors must be True or False",
    ),  # type: ignore[arg-type]
    (
        "unload(wait='no')",
        lambda: loaded().unload(wait="no"),
        InvalidArgumentError,
        "wait must be True or False",
    ),  # type: ignore[arg-type]
    (
        "unload(strict='false')",
        lambda: loaded().unload(strict="false"),
        InvalidArgumentError,
        "strict must be True or False",
    ),  # type: ignore[arg-type]
    (
        "offload(wait='yes')",
        lambda: loaded().offload("cpu", wait="yes"),
        InvalidArgumentError,
        "wait must be True or False",
    ),  # type: ignore[arg-type]
    (
        "offload(rewrite='yes')",
        lambda: loaded().offload("cpu", rewrite="yes"),
        InvalidArgumentError,
        "rewrite must be True or False",
    ),  # type: ignore[arg-type]
    (
        "inference(inference_mode='x')",
        lambda: loaded().inference(inference_mode="x"),
        InvalidArgumentError,
        "inference_mode must be True or False",
    ),  # type: ignore[call-overload]
    (
        "from_torch(eval='false')",
        lambda: ManagedModel.from_torch(tiny, eval="false"),
        InvalidArgumentError,
        "eval must be True or False",
    ),  # type: ignore[arg-type]
    (
        "from_onnx(arena='false')",
        lambda: ManagedModel.from_onnx(__file__, arena="false"),
        InvalidArgumentError,
        "arena must be True or False",
    ),  # type: ignore[arg-type]
    (
        "from_funasr(disable_update='false')",
        lambda: ManagedModel.from_funasr(".", disable_update="false"),
        InvalidArgumentError,
        "disable_update must be True or False",
    ),  # type: ignore[arg-type]
    (
        "pool.register(pin='no')",
        lambda: ModelPool("cpu", budget="1GiB").register("m", tiny, pin="no"),
        InvalidArgumentError,
        "pin must be True or False",
    ),  # type: ignore[arg-type]
    (
        "pool.add(pin='no')",
        lambda: ModelPool("cpu", budget="1GiB").add(ManagedModel(tiny, device="cpu"), pin="no"),
        InvalidArgumentError,
        "pin must be True or False",
    ),  # type: ignore[arg-type]
    (
        "ModelPool(start_threads='no')",
        lambda: ModelPool("cpu", start_threads="no"),
        InvalidArgumentError,
        "start_threads must be True or False",
    ),  # type: ignore[arg-type]
    (
        "ModelPool(timeout=nan)",
        lambda: ModelPool("cpu", timeout=math.nan),
        InvalidArgumentError,
        "timeout must be",
    ),
    (
        "ModelPool(keep_alive=nan)",
        lambda: ModelPool("cpu", keep_alive=math.nan),
        InvalidArgumentError,
        "keep_alive must be",
    ),
    (
        "unload(timeout=nan)",
        lambda: loaded().unload(timeout=math.nan),
        InvalidArgumentError,
        "timeout must be",
    ),
    (
        "offload(timeout=nan)",
        lambda: loaded().offload("cpu", timeout=math.nan),
        InvalidArgumentError,
        "timeout must be",
    ),
    (
        "ManagedModel(driver_wait=nan)",
        lambda: ManagedModel(tiny, driver_wait=math.nan),
        InvalidArgumentError,
        "driver_wait must be",
    ),
    (
        "ManagedModel(driver_wait=inf)",
        lambda: ManagedModel(tiny, driver_wait=math.inf),
        InvalidArgumentError,
        "driver_wait must be",
    ),
    (
        "ManagedModel(cleanup='x')",
        lambda: ManagedModel(tiny, cleanup="x"),
        InvalidArgumentError,
        "cleanup must be a CleanupPolicy",
    ),  # type: ignore[arg-type]
    (
        "ManagedModel(config=5)",
        lambda: ManagedModel(tiny, config=5),
        InvalidArgumentError,
        "config must be",
    ),  # type: ignore[arg-type]
    (
        "ManagedModel(offload_dir=5)",
        lambda: ManagedModel(tiny, offload_dir=5),
        InvalidArgumentError,
        "offload_dir must be",
    ),  # type: ignore[arg-type]
    (
        "pool.plan(0)",
        lambda: ModelPool("cpu", budget="1GiB").plan(0),
        InvalidArgumentError,
        "names must be",
    ),  # type: ignore[arg-type]
    (
        "pool.evict_idle(exclude=0)",
        lambda: ModelPool("cpu", budget="1GiB").evict_idle(exclude=0),
        InvalidArgumentError,
        "exclude must be",
    ),  # type: ignore[arg-type]
    (
        "find_referrers(max_depth='a')",
        lambda: vramkit.find_referrers(object(), max_depth="a"),
        InvalidArgumentError,
        "max_depth must be",
    ),  # type: ignore[arg-type]
    (
        "from_funasr(manager_options={'': 1})",
        lambda: ManagedModel.from_funasr("model-dir", manager_options={"": 1}),
        InvalidArgumentError,
        "manager_options must be",
    ),
    (
        "pool.call('a', fn='x')",
        lambda: ModelPool("cpu", budget="1GiB").call("a", "x"),
        InvalidArgumentError,
        "fn must be a callable",
    ),  # type: ignore[arg-type]
    (
        "find_holders('abc')",
        lambda: vramkit.referrers.find_holders("abc"),
        InvalidArgumentError,
        "targets must be a sequence",
    ),
    (
        "find_holders_each([x], max_chains='a')",
        lambda: vramkit.referrers.find_holders_each([object()], max_chains="a"),
        InvalidArgumentError,
        "max_chains must be",
    ),  # type: ignore[arg-type]
    (
        "find_referrers(ignore=5)",
        lambda: vramkit.find_referrers(object(), ignore=5),
        InvalidArgumentError,
        "ignore must be",
    ),  # type: ignore[arg-type]
]


@pytest.mark.parametrize(("label", "call", "error", "fragment"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_table(
    label: str, call: Callable[[], Any], error: type[BaseException], fragment: str
) -> None:
    with pytest.raises(error) as info:
        call()
    assert isinstance(info.value, VramkitError)
    assert fragment in str(info.value), str(info.value)


def test_table_is_recorded(reliability: Record) -> None:
    reliability.area = "bad input"
    reliability.load = "every public entry point"
    reliability.bad_inputs = (
        f"{len(CASES)} calls: wrong types, out-of-range values, malformed unit strings, "
        "unknown devices, closed pools, missing paths and names"
    )
    reliability.figures = {"cases": len(CASES)}


@pytest.mark.parametrize(
    "misuse",
    ["unload", "unload-wait", "offload", "remove"],
)
def test_reentrant_misuse_raises_at_once(misuse: str, reliability: Record) -> None:
    pool = ModelPool("cpu", budget="1GiB", name="reentrant")
    mm = pool.register("m", tiny)
    calls: dict[str, Callable[[], Any]] = {
        "unload": mm.unload,
        "unload-wait": lambda: mm.unload(wait=True),
        "offload": lambda: mm.offload("cpu", wait=True),
        "remove": lambda: pool.remove("m"),
    }
    started = time.perf_counter()
    with pool.use("m"), pytest.raises(ModelBusyError, match="inside its own lease"):
        calls[misuse]()
    assert time.perf_counter() - started < 2  # at once, not a deadlock
    assert mm.unload().died
    pool.close()
    reliability.area = "bad input"
    reliability.bad_inputs = f"{misuse} from inside the model's own lease"
    reliability.figures = {"raised after seconds": round(time.perf_counter() - started, 3)}


def test_a_loader_that_uses_its_own_model_raises_instead_of_deadlocking(
    reliability: Record,
) -> None:
    holder: list[ManagedModel[Any]] = []

    def recursive() -> torch.nn.Module:
        with holder[0].use():
            return tiny()

    mm = ManagedModel(recursive, name="recursive", device="cpu")
    holder.append(mm)
    with pytest.raises(ModelStateError, match="while this thread is loading"):
        mm.load()
    assert mm.state is ModelState.UNLOADED
    reliability.area = "bad input"
    reliability.bad_inputs = "a loader that takes a lease on the model it is loading"


class ModelMachine(RuleBasedStateMachine):
    """Random sequences of load, use, offload, wake and unload keep the model consistent."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.directory = Path(tempfile.mkdtemp())
        torch.manual_seed(0)
        self.template = TinyMLP(32)
        self.state = {k: v.clone() for k, v in self.template.state_dict().items()}
        self.x = torch.ones(1, 32)
        self.reference = self.template(self.x).detach()
        self.mm = ManagedModel(self.build, name="sm", device="cpu", offload_dir=self.directory)
        self.expected = ModelState.UNLOADED

    def build(self) -> torch.nn.Module:
        module = TinyMLP(32)
        module.load_state_dict(self.state)
        return module.eval()

    @rule()
    def use(self) -> None:
        with self.mm.use() as module:
            assert torch.equal(module(self.x), self.reference)
        self.expected = ModelState.READY

    @rule()
    def load(self) -> None:
        self.mm.load()
        self.expected = ModelState.READY

    @rule()
    def unload(self) -> None:
        report = self.mm.unload()
        assert report.died
        self.expected = ModelState.UNLOADED

    @precondition(lambda self: self.expected is not ModelState.UNLOADED)
    @rule(tier=st.sampled_from(["cpu", "disk"]))
    def offload(self, tier: str) -> None:
        self.mm.offload(tier)
        assert self.mm.tier == tier
        self.expected = ModelState.OFFLOADED

    @precondition(lambda self: self.expected is ModelState.UNLOADED)
    @rule(tier=st.sampled_from(["cpu", "disk"]))
    def offload_unloaded(self, tier: str) -> None:
        try:
            self.mm.offload(tier)
        except ModelStateError:
            return
        raise AssertionError("offloading an unloaded model must raise")

    @rule()
    def wake(self) -> None:
        report = self.mm.wake()
        if self.expected is ModelState.OFFLOADED:
            assert report is not None
            self.expected = ModelState.READY
        else:
            assert report is None

    @invariant()
    def consistent(self) -> None:
        assert self.mm.state is self.expected
        assert self.mm.leases == 0
        assert (self.mm.tier is not None) == (self.expected is ModelState.OFFLOADED)

    def teardown(self) -> None:
        self.mm.unload()
        import shutil

        shutil.rmtree(self.directory, ignore_errors=True)


TestModelMachine = ModelMachine.TestCase
TestModelMachine.settings = settings(
    max_examples=scale(25, 300),
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def test_state_machine_is_recorded(reliability: Record) -> None:
    reliability.area = "bad input"
    reliability.load = (
        f"hypothesis: {scale(25, 300)} random programs of up to 12 steps of "
        "load/use/offload(cpu|disk)/wake/unload"
    )
    reliability.bad_inputs = "offloading an unloaded model, waking a model that is not offloaded"
    reliability.figures = {"examples": scale(25, 300)}
