"""Property-based fuzz of every public entry point: clear errors only, and nothing hangs.

Each entry point is called many times with a random mix of valid arguments and
hostile ones (NaN, infinities, 1e308, huge and negative integers, booleans
where numbers go, strings with spaces, capitals, other scripts' digits, empty
strings, bytes, lists, dicts, plain objects, callables where data goes).
Every call must either succeed or fail with

- a :class:`~vramkit.VramkitError` (a documented error); an
  ``InvalidArgumentError`` must name one of the call's parameters, or
- a builtin ``ValueError`` / ``TypeError`` that names one of them.

Anything else (``AttributeError``, ``OverflowError``, a raw ``TypeError``
about an ``int`` not being iterable...) is an unclear error. Each call runs on
a watchdog thread: one that does not return within its bound is a hang, and
the run stops there with the call that hung.

CI runs a short version (a few thousand calls); ``VRAMKIT_STRESS=long`` runs
more than 20,000.
"""

from __future__ import annotations

import datetime
import math
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vramkit
from vramkit import ManagedModel, ModelPool, VramkitError, events
from vramkit.errors import InvalidArgumentError, UnknownModelError
from vramkit.referrers import find_holders, find_holders_each
from vramkit.testing.models import TinyMLP

from .conftest import LONG, Record, scale

HANG_BOUND = 60.0  # seconds a single call may take before it counts as a hang

# ---------------------------------------------------------------------- values


class Opaque:
    """An object no entry point should accept where data is expected."""

    def __repr__(self) -> str:
        return "<opaque>"


SPECIAL_FLOATS = st.sampled_from(
    [math.nan, math.inf, -math.inf, 1e308, -1e308, 9.3e9, 5e-324, -0.0, 0.0, -1.0, 0.5, 2.0]
)
SPECIAL_INTS = st.sampled_from([0, 1, -1, 2**31, 2**63, -(2**63), 2**64, 2**100, -(2**100)])
SPECIAL_TEXT = st.sampled_from(
    [
        "",
        " ",
        "cpu",
        " cpu",
        "CPU",
        "cpu:00",
        "cuda",
        "cuda:0",
        "cuda:-1",
        "mps",
        "meta",
        "1GiB",
        "1e99GiB",
        "\u0661\u0662MiB",
        "-1GiB",
        "10G",
        "false",
        "true",
        "nan",
        "inf",
        "none",
        "disk",
        "unload",
        "raise",
        "x" * 300,
        "../etc/passwd",
        "\x00",
    ]
)
HOSTILE: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    SPECIAL_INTS,
    st.integers(min_value=-(2**70), max_value=2**70),
    SPECIAL_FLOATS,
    st.floats(allow_nan=True, allow_infinity=True),
    SPECIAL_TEXT,
    st.text(max_size=8),
    st.binary(max_size=8),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.tuples(st.integers()),
    st.just(Opaque()),
    st.just(lambda: None),
    st.just(print),
    st.sampled_from([datetime.timedelta.max, datetime.timedelta(seconds=-1), datetime.timedelta()]),
    st.just(torch.device("cpu")),
    st.just(torch.float16),
)


def arg(valid: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A parameter's values: valid ones about half the time, hostile ones otherwise."""
    return st.one_of(valid, HOSTILE)


SECONDS = st.floats(min_value=0, max_value=0.05)
SIZES = st.sampled_from([0, 1, 4096, "16MiB", "1.5 GiB", "512KiB", 2**20])
FLAGS = st.booleans()
DEVICES = st.sampled_from(["cpu", "cpu:0", torch.device("cpu"), None])


def tiny() -> torch.nn.Module:
    return TinyMLP(8)


# ---------------------------------------------------------------------- targets


@dataclass
class Targets:
    """Long-lived objects the method entry points are called on (rebuilt when consumed)."""

    directory: Path
    onnx_file: Path
    funasr_dir: Path
    model: ManagedModel[Any] = field(init=False)
    pool: ModelPool = field(init=False)

    def __post_init__(self) -> None:
        self.model = ManagedModel(tiny, name="fuzzed", device="cpu", offload_dir=self.directory)
        self.pool = ModelPool("cpu", budget="64MiB", headroom=0, timeout=1, name="fuzz")
        self.refill()

    def refill(self) -> None:
        """Put back pool members a call removed, and settle the target model."""
        for name in ("a", "b"):
            if name not in self.pool:
                self.pool.register(name, tiny, size_hint=2**20, offload_dir=self.directory)
        if self.model.state is not vramkit.ModelState.UNLOADED:
            self.model.unload(wait=True)

    def close(self) -> None:
        self.pool.close()
        self.model.close()


def _closing(value: Any) -> Any:
    """Close the pool or model a successful call made."""
    if isinstance(value, ModelPool | ManagedModel):
        value.close()
    return value


def _use(pool: ModelPool, name: Any) -> None:
    with pool.use(name):
        pass


def _prefetch(pool: ModelPool, name: Any) -> Any:
    return pool.prefetch(name).result(timeout=HANG_BOUND / 2)


def _subscribe(callback: Any) -> None:
    events.subscribe(callback)()


@dataclass(frozen=True)
class Entry:
    """One public entry point: how to call it, and what each parameter may be."""

    name: str
    call: Callable[[Targets, dict[str, Any]], Any]
    params: dict[str, st.SearchStrategy[Any]]
    weight: int = 10  # relative number of examples (cheap entries get more)
    names: tuple[str, ...] = ()  # words a clear message may use instead of a parameter name


def _entries() -> list[Entry]:
    return [
        Entry(
            "parse_bytes",
            lambda t, k: vramkit.parse_bytes(**k),
            {"value": arg(SIZES), "what": arg(st.just("size"))},
            weight=40,
            names=("size",),
        ),
        Entry(
            "format_bytes",
            lambda t, k: vramkit.format_bytes(**k),
            {
                "value": arg(st.integers() | st.floats(allow_nan=False, allow_infinity=False)),
                "precision": arg(st.integers(0, 6)),
                "signed": arg(FLAGS),
            },
            weight=40,
        ),
        Entry(
            "resolve_device",
            lambda t, k: vramkit.resolve_device(**k),
            {"spec": arg(DEVICES)},
            weight=40,
            names=("device",),
        ),
        Entry(
            "snapshot",
            lambda t, k: vramkit.snapshot(**k),
            {"device": arg(DEVICES | st.just(["cpu"]))},
            weight=20,
        ),
        Entry(
            "cleanup",
            lambda t, k: vramkit.cleanup(**k),
            {"device": arg(DEVICES), "gc_collect": arg(st.just(False)), "trim": arg(FLAGS)},
            weight=10,
        ),
        Entry(
            "live_tensors",
            lambda t, k: len(vramkit.live_tensors(**k)),
            {"device": HOSTILE},
            weight=4,
        ),
        Entry(
            "find_referrers",
            lambda t, k: vramkit.find_referrers(t.model, **k),
            {
                "max_depth": arg(st.integers(1, 3)),
                "max_chains": arg(st.integers(1, 3)),
                "max_objects": arg(st.integers(1, 100)),
                "seconds": arg(SECONDS),
                "ignore": arg(st.just(())),
            },
            weight=4,
        ),
        Entry(
            "find_holders",
            lambda t, k: find_holders(**k),
            {
                "targets": arg(st.builds(lambda: [object()])),
                "max_depth": arg(st.integers(1, 3)),
                "max_objects": arg(st.integers(1, 100)),
                "seconds": arg(SECONDS),
                "first_only": arg(FLAGS),
            },
            weight=2,
        ),
        Entry(
            "find_holders_each",
            lambda t, k: find_holders_each(**k),
            {
                "targets": arg(st.builds(lambda: [object(), object()])),
                "max_chains": arg(st.integers(1, 3)),
                "max_objects": arg(st.integers(1, 100)),
            },
            weight=2,
        ),
        Entry(
            "gpu_session",
            lambda t, k: vramkit.gpu_session(**k),
            {
                "device": arg(DEVICES),
                "leak_check": arg(st.sampled_from(["raise", "warn", None])),
                "tolerance": arg(SIZES),
                "cleanup": arg(FLAGS),
                "retries": arg(st.integers(0, 5)),
                "process_tolerance": arg(SIZES | st.none()),
                "name": arg(st.text(max_size=5) | st.none()),
            },
            weight=20,
        ),
        Entry(
            "CleanupPolicy",
            lambda t, k: vramkit.CleanupPolicy(**k),
            {
                "every_calls": arg(st.integers(1, 10) | st.none()),
                "every_seconds": arg(SECONDS.filter(bool) | st.none()),
                "above_fraction": arg(st.floats(0.1, 1) | st.none()),
                "check_every_seconds": arg(SECONDS),
                "on_pressure": arg(st.none() | st.just(print)),
                "pressure_fraction": arg(st.floats(0.1, 1)),
            },
            weight=20,
        ),
        Entry(
            "CleanupPolicy.tracker",
            lambda t, k: vramkit.CleanupPolicy().tracker(**k),
            {"device": arg(DEVICES), "clock": arg(st.just(lambda: 0.0))},
            weight=10,
        ),
        Entry(
            "oom_retry",
            lambda t, k: vramkit.oom_retry(**k),
            {
                "retries": arg(st.integers(0, 3)),
                "on_oom": arg(st.none() | st.just(print)),
                "pool": arg(st.none()),
                "device": arg(DEVICES),
            },
            weight=20,
        ),
        Entry(
            "adaptive_batch_size",
            lambda t, k: vramkit.adaptive_batch_size(**k),
            {
                "start": arg(st.integers(1, 64)),
                "backoff": arg(st.floats(0.1, 0.9)),
                "minimum": arg(st.integers(1, 4)),
                "param": arg(st.just("batch_size")),
                "device": arg(DEVICES),
            },
            weight=20,
        ),
        Entry(
            "managed",
            lambda t, k: vramkit.managed(**k),
            {
                "device": arg(DEVICES),
                "cleanup": arg(st.just(vramkit.CleanupPolicy.never())),
                "oom_retries": arg(st.integers(0, 2)),
                "session": arg(st.none()),
            },
            weight=20,
        ),
        Entry(
            "is_oom_error",
            lambda t, k: vramkit.is_oom_error(**k),
            {"exc": arg(st.just(MemoryError()) | st.just(RuntimeError("CUDA out of memory.")))},
            weight=10,
        ),
        Entry(
            "events.subscribe",
            lambda t, k: _subscribe(**k),
            {"callback": arg(st.just(print))},
            weight=10,
        ),
        Entry(
            "status",
            lambda t, k: vramkit.status(**k),
            {"device": arg(st.sampled_from(["cpu", None]))},
            weight=4,
        ),
        Entry(
            "ManagedModel",
            lambda t, k: _closing(ManagedModel(**k)),
            {
                "loader": arg(st.just(tiny)),
                "name": arg(st.text(min_size=1, max_size=5) | st.none()),
                "device": arg(DEVICES),
                "keep_alive": arg(SECONDS | st.none()),
                "inference_mode": arg(FLAGS),
                "strict": arg(FLAGS),
                "free_survivors": arg(FLAGS),
                "owns": arg(FLAGS),
                "driver_wait": arg(SECONDS),
                "offload_dir": arg(st.none()),
                "size_hint": arg(SIZES | st.none()),
                "config": arg(st.none() | st.just({"a": 1})),
                "cleanup": arg(st.none()),
                "release": arg(st.none()),
                "size": arg(st.none()),
                "adapter": arg(st.none()),
            },
            weight=30,
        ),
        Entry(
            "ManagedModel.from_torch",
            lambda t, k: _closing(ManagedModel.from_torch(**k)),
            {
                "factory": arg(st.just(tiny)),
                "device": arg(DEVICES),
                "dtype": arg(st.none() | st.just(torch.float32)),
                "eval": arg(FLAGS),
                "name": arg(st.text(min_size=1, max_size=5) | st.none()),
            },
            weight=20,
        ),
        Entry(
            "ManagedModel.from_onnx",
            lambda t, k: _closing(ManagedModel.from_onnx(**k)),
            {
                "path": arg(st.just("__onnx__")),
                "providers": arg(st.none() | st.just(["CPUExecutionProvider"])),
                "provider_options": arg(st.none()),
                "device": arg(DEVICES),
                "arena": arg(FLAGS),
                "name": arg(st.text(min_size=1, max_size=5) | st.none()),
            },
            weight=15,
            names=("ONNX model",),
        ),
        Entry(
            "ManagedModel.from_funasr",
            lambda t, k: _closing(ManagedModel.from_funasr(**k)),
            {
                "model": arg(st.just("__funasr__")),
                "device": arg(DEVICES),
                "name": arg(st.text(min_size=1, max_size=5) | st.none()),
                "disable_update": arg(FLAGS),
                "manager_options": arg(st.none() | st.just({"keep_alive": 1})),
            },
            weight=15,
        ),
        Entry(
            "ManagedModel.unload",
            lambda t, k: t.model.unload(**k),
            {"wait": arg(FLAGS), "timeout": arg(SECONDS | st.none()), "strict": arg(FLAGS)},
            weight=20,
        ),
        Entry(
            "ManagedModel.offload",
            lambda t, k: t.model.offload(**k),
            {
                "tier": arg(st.sampled_from(["cpu", "disk"])),
                "wait": arg(FLAGS),
                "timeout": arg(SECONDS | st.none()),
                "rewrite": arg(FLAGS),
            },
            weight=20,
        ),
        Entry(
            "ManagedModel.inference",
            lambda t, k: t.model.inference(**k),
            {"inference_mode": arg(FLAGS | st.none()), "cleanup": arg(st.none())},
            weight=15,
        ),
        Entry(
            "ManagedModel.choose_tier",
            lambda t, k: t.model.choose_tier(**k),
            {"host_free_bytes": arg(st.integers(0, 2**40) | st.none())},
            weight=15,
        ),
        Entry(
            "ModelPool",
            lambda t, k: _closing(ModelPool(**k)),
            {
                "device": arg(DEVICES),
                "budget": arg(SIZES.filter(bool) | st.floats(0.1, 1) | st.none()),
                "headroom": arg(SIZES),
                "keep_alive": arg(SECONDS | st.none()),
                "timeout": arg(SECONDS | st.none()),
                "evict_to": arg(st.sampled_from(["auto", "cpu", "disk", "unload"])),
                "name": arg(st.text(min_size=1, max_size=5)),
                "clock": arg(st.just(lambda: 0.0)),
                "start_threads": arg(FLAGS),
            },
            weight=30,
        ),
        Entry(
            "ModelPool.register",
            lambda t, k: t.pool.remove(t.pool.register(**k).name),
            {
                "name": arg(st.sampled_from(["c", "d"])),
                "loader": arg(st.just(tiny)),
                "pin": arg(FLAGS),
                "keep_alive": arg(SECONDS | st.none() | st.just("pool")),
            },
            weight=20,
        ),
        Entry(
            "ModelPool.add",
            lambda t, k: t.pool.remove(t.pool.add(**k).name),
            {
                "model": arg(st.builds(lambda: ManagedModel(tiny, name="added", device="cpu"))),
                "pin": arg(FLAGS),
            },
            weight=15,
        ),
        Entry(
            "ModelPool.use",
            lambda t, k: _use(t.pool, **k),
            {"name": arg(st.sampled_from(["a", "b", "zzz"]))},
            weight=15,
        ),
        Entry(
            "ModelPool.__getitem__",
            lambda t, k: t.pool[k["name"]] if "name" in k else None,
            {"name": arg(st.sampled_from(["a", "zzz"]))},
            weight=20,
        ),
        Entry(
            "ModelPool.prefetch",
            lambda t, k: _prefetch(t.pool, **k),
            {"name": arg(st.sampled_from(["a", "b", "zzz"]))},
            weight=10,
        ),
        Entry(
            "ModelPool.plan",
            lambda t, k: t.pool.plan(**k),
            {"names": arg(st.lists(st.sampled_from(["a", "b"]), max_size=3))},
            weight=20,
        ),
        Entry(
            "ModelPool.set_budget",
            lambda t, k: t.pool.set_budget(**k),
            {"budget": arg(st.sampled_from(["64MiB", 2**26, 0.5, None]))},
            weight=15,
        ),
        Entry(
            "ModelPool.evict_idle",
            lambda t, k: t.pool.evict_idle(**k),
            {"exclude": arg(st.lists(st.sampled_from(["a", "b"]), max_size=2))},
            weight=10,
        ),
        Entry(
            "ModelPool.call",
            lambda t, k: t.pool.call(**k),
            {
                "name": arg(st.sampled_from(["a", "zzz"])),
                "fn": arg(st.just(lambda model: None)),
            },
            weight=10,
        ),
        Entry(
            "ModelPool.remove",
            lambda t, k: t.pool.remove(**k),
            {"name": arg(st.sampled_from(["a", "zzz"]))},
            weight=10,
        ),
        Entry(
            "register_backend",
            lambda t, k: vramkit.devices.register_backend(**k),
            {"backend": HOSTILE, "replace": arg(st.just(False))},
            weight=10,
        ),
    ]


ENTRIES = _entries()

# ---------------------------------------------------------------------- the watchdog


class Watchdog:
    """Runs calls on one worker thread; a call that outlives its bound is a hang."""

    def __init__(self) -> None:
        self._calls: queue.Queue[Callable[[], Any]] = queue.Queue()
        self._results: queue.Queue[tuple[bool, Any]] = queue.Queue()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="fuzz-watchdog")
        self._thread.start()

    def _serve(self) -> None:
        while True:
            call = self._calls.get()
            try:
                self._results.put((True, call()))
            except BaseException as exc:
                self._results.put((False, exc))

    def run(self, call: Callable[[], Any], bound: float) -> tuple[bool, Any] | None:
        """``(returned, value or exception)``, or ``None`` when the call hung."""
        self._calls.put(call)
        try:
            return self._results.get(timeout=bound)
        except queue.Empty:
            return None


# ---------------------------------------------------------------------- judging


def _names_a_parameter(message: str, entry: Entry, kwargs: dict[str, Any]) -> bool:
    words = {*entry.params, *entry.names}
    if isinstance(kwargs.get("what"), str):  # parse_bytes names the value by its `what`
        words.add(kwargs["what"])
    return any(word and word in message for word in words)


def judge(entry: Entry, kwargs: dict[str, Any], exc: BaseException) -> str | None:
    """Why ``exc`` is an unclear error, or ``None`` when it is a clear one."""
    message = str(exc)
    if isinstance(exc, UnknownModelError):
        return None
    if isinstance(exc, InvalidArgumentError):
        if _names_a_parameter(message, entry, kwargs):
            return None
        return "InvalidArgumentError naming none of the parameters"
    if isinstance(exc, VramkitError):
        return None
    if isinstance(exc, ValueError | TypeError) and _names_a_parameter(message, entry, kwargs):
        return None
    return f"{type(exc).__name__}"


@dataclass
class Tally:
    calls: int = 0
    ok: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    unclear: list[str] = field(default_factory=list)
    hung: str | None = None


def _describe(kwargs: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}"[:80] for k, v in kwargs.items())


def fuzz(entry: Entry, targets: Targets, watchdog: Watchdog, tally: Tally, examples: int) -> None:
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=not LONG,  # CI: the same calls every run; long runs explore
        suppress_health_check=list(HealthCheck),
    )
    @given(st.fixed_dictionaries({}, optional=entry.params))
    def one(kwargs: dict[str, Any]) -> None:
        if tally.hung is not None:
            return
        for key, value in list(kwargs.items()):
            if value == "__onnx__":
                kwargs[key] = targets.onnx_file
            elif value == "__funasr__":
                kwargs[key] = targets.funasr_dir
        outcome = watchdog.run(lambda: entry.call(targets, kwargs), HANG_BOUND)
        tally.calls += 1
        if outcome is None:
            tally.hung = f"{entry.name}({_describe(kwargs)})"
            return
        returned, value = outcome
        if returned:
            tally.ok += 1
        else:
            why = judge(entry, kwargs, value)
            if why is None:
                tally.rejected[type(value).__name__] += 1
            elif sum(line.startswith(f"{entry.name}(") for line in tally.unclear) < 3:
                tally.unclear.append(
                    f"{entry.name}({_describe(kwargs)}): {why}: {type(value).__name__}: {value}"
                )
        settled = watchdog.run(targets.refill, HANG_BOUND)
        if settled is None:
            tally.hung = f"settling after {entry.name}({_describe(kwargs)})"

    one()


@pytest.fixture
def targets(tmp_path: Path) -> Iterator[Targets]:
    from vramkit.testing.models import build_onnx_mlp

    funasr_dir = tmp_path / "funasr"
    funasr_dir.mkdir()
    (funasr_dir / "config.yaml").write_text("model: None\n")
    found = Targets(tmp_path / "cache", build_onnx_mlp(tmp_path / "m.onnx"), funasr_dir)
    yield found
    found.close()


@pytest.mark.timeout(3600)
def test_fuzz_every_public_entry_point(targets: Targets, reliability: Record) -> None:
    per_weight = scale(2, 35)  # examples per unit of weight: ~1,250 calls in CI, ~22,000 long
    watchdog = Watchdog()
    tally = Tally()
    for entry in ENTRIES:
        fuzz(entry, targets, watchdog, tally, examples=per_weight * entry.weight)
        if tally.hung is not None:
            break
    print(
        f"fuzz: {tally.calls} calls over {len(ENTRIES)} entry points; {tally.ok} succeeded, "
        f"{sum(tally.rejected.values())} rejected clearly, {len(tally.unclear)} unclear, "
        f"{0 if tally.hung is None else 1} hung"
    )
    reliability.area = "bad input"
    reliability.load = (
        f"hypothesis: random valid and hostile arguments to {len(ENTRIES)} public entry points, "
        "each call on a watchdog thread"
    )
    reliability.bad_inputs = (
        "NaN, infinities, 1e308, huge and negative integers, booleans for numbers, strings "
        "with spaces, capitals and other scripts' digits, bytes, lists, dicts, objects, "
        "callables where data goes"
    )
    reliability.note = (
        "Every rejection must be a vramkit error, or a ValueError/TypeError naming a "
        "parameter; anything else counts as unclear. CI runs the short version with a fixed "
        "seed; the long run explores more than 20,000 calls."
    )
    reliability.figures = {
        "calls": tally.calls,
        "unclear errors": len(tally.unclear),
        "hangs": 0 if tally.hung is None else 1,
        "succeeded": tally.ok,
        "rejected clearly": dict(tally.rejected.most_common()),
    }
    assert tally.hung is None, f"a call did not return within {HANG_BOUND:g} s: {tally.hung}"
    assert tally.unclear == [], "\n".join(tally.unclear)
