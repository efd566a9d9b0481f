"""The holder search cannot crash or lie: identity only, bounded by work, roots of every kind."""

from __future__ import annotations

import gc
import itertools
from collections.abc import Iterator
from typing import Any

import pytest
import torch

import vramkit.referrers as referrers
from vramkit.referrers import ReferrerChain, find_holders, find_referrers

calls: list[str] = []  # every user-level method the search must never call lands here
kept: list[Any] = []
table: dict[str, Any] = {}


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    yield
    calls.clear()
    kept.clear()
    table.clear()
    gc.collect()


class Target:
    """The object that should have died. Comparing or hashing it is a bug in the search."""

    def __eq__(self, other: object) -> bool:
        calls.append("Target.__eq__")
        return NotImplemented

    def __hash__(self) -> int:
        calls.append("Target.__hash__")
        return 0


class Hostile(dict):  # type: ignore[type-arg]
    """An EasyDict / ModelOutput-like holder whose every user-level method misbehaves."""

    def __init__(self, **items: Any) -> None:
        super().__init__(**items)
        for key, value in items.items():
            object.__setattr__(self, key, value)

    def __getattr__(self, name: str) -> Any:
        calls.append(f"__getattr__({name})")
        raise RuntimeError("attribute lookup on a foreign object")

    def __contains__(self, key: object) -> bool:
        calls.append("__contains__")
        raise TypeError("unhashable type: 'dict'")

    def __eq__(self, other: object) -> bool:
        calls.append("__eq__")
        raise RuntimeError("compared")

    __hash__ = None  # type: ignore[assignment]

    def __iter__(self) -> Iterator[Any]:
        calls.append("__iter__")
        raise RuntimeError("iterated")

    def items(self) -> Any:  # type: ignore[override]
        calls.append("items")
        raise RuntimeError("items")

    def values(self) -> Any:  # type: ignore[override]
        calls.append("values")
        raise RuntimeError("values")

    def __repr__(self) -> str:
        calls.append("__repr__")
        raise RuntimeError("repr")

    @property
    def __dict__(self) -> Any:  # type: ignore[override]
        calls.append("__dict__ property")
        raise RuntimeError("__dict__")


class HostileList(list):  # type: ignore[type-arg]
    def __iter__(self) -> Iterator[Any]:
        calls.append("HostileList.__iter__")
        raise RuntimeError("iterated")

    def __eq__(self, other: object) -> bool:
        calls.append("HostileList.__eq__")
        raise RuntimeError("compared")

    __hash__ = None  # type: ignore[assignment]


class Key:
    """A dict key whose repr and hash are user code."""

    def __repr__(self) -> str:
        calls.append("Key.__repr__")
        return "Key()"

    def __hash__(self) -> int:
        return 1

    def __eq__(self, other: object) -> bool:
        calls.append("Key.__eq__")
        return self is other


def _chains(target: object, **options: Any) -> list[str]:
    return [str(c) for c in find_referrers(target, **options)]


def _global_chains(target: object, **options: Any) -> list[str]:
    chains = find_referrers(target, **options)
    return [str(c) for c in chains if c.root in ("module global", "unknown")]


def test_hostile_holders_are_walked_by_identity_only() -> None:
    target = Target()
    inner = {"weights": target}  # a dict below the hostile one: `x in hostile` used to raise
    kept.append(Hostile(output=HostileList([inner]), logits=inner))
    table[Key()] = target  # type: ignore[index]
    chains = _chains(target)
    # Its __dict__ is a property (user code), so the entry is named as a dict key.
    assert f"{__name__}.kept[0]['logits']['weights']" in chains, chains
    assert f"{__name__}.table[<Key>]" in chains, chains
    assert calls == []


def test_a_failure_inside_the_search_degrades_to_holder_not_found(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: Any) -> Any:
        raise TypeError("unhashable type: 'dict'")

    monkeypatch.setattr(referrers._walk, "_edges", broken)  # where the walk calls it
    kept.append(Target())
    (chain,) = find_referrers(kept[0])
    assert chain == ReferrerChain("unknown", ("holder not found (search failed: TypeError)",))


def test_the_walk_does_not_read_the_clock_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # A machine so busy that each clock reading is an hour later: the same chains.
    target = Target()
    kept.append({"a": {"b": [target]}})
    expected = _global_chains(target)
    hours = itertools.count(0, 3600.0)
    monkeypatch.setattr(referrers.time, "perf_counter", lambda: float(next(hours)))
    assert _global_chains(target) == expected == [f"{__name__}.kept[0]['a']['b'][0]"]
    # The optional cap still works for people who want it.
    assert _global_chains(target, seconds=1.0) != expected


def test_the_same_heap_gives_the_same_report() -> None:
    target = Target()
    names = [f"_holder{i}" for i in range(40)]  # wider than one level of the walk
    for name in names:
        globals()[name] = [target]
    try:
        first = _global_chains(target, max_chains=10)
        for _ in range(3):
            gc.collect()  # moves objects between generations: gc's order changes
            assert _global_chains(target, max_chains=10) == first
    finally:
        for name in names:
            del globals()[name]
    assert first == sorted(f"{__name__}.{name}[0]" for name in names)[:10]


def test_work_bounds_end_the_walk_with_partial_chains() -> None:
    target = Target()
    deep: Any = target
    for _ in range(30):
        deep = [deep]
    kept.append(deep)
    del deep  # a local is a root of its own
    chains = [c for c in find_referrers(target, max_depth=5) if c.root != "frame"]
    assert chains
    assert all(c.root == "unknown" and c.steps[0] == "..." for c in chains)
    assert _global_chains(target, max_depth=40) == [f"{__name__}.kept[0]" + "[0]" * 30]


def _closure(value: object) -> Any:
    def use() -> object:
        return value

    return use


class Registry:
    slot_holder: Any = None


class Slotted:
    __slots__ = ("payload",)

    def __init__(self, payload: object) -> None:
        self.payload = payload


def _suspended(value: object) -> Iterator[int]:
    held = value  # noqa: F841 - a local of the suspended generator
    yield 1


@pytest.mark.parametrize(
    ("plant", "expected"),
    [
        pytest.param(
            lambda t: table.__setitem__("fn", _closure(t)),
            f"{__name__}.table['fn'] -> closure of _closure.<locals>.use (variable 'value')",
            id="closure-cell",
        ),
        pytest.param(
            lambda t: setattr(Registry, "slot_holder", t),
            f"{__name__}.Registry.slot_holder",
            id="class-attribute",
        ),
        pytest.param(
            lambda t: kept.append(Slotted(t)), f"{__name__}.kept[0] -> Slotted.payload", id="slot"
        ),
        pytest.param(
            lambda t: kept.append((0, frozenset([t]))), f"{__name__}.kept[0][1]{{...}}", id="set"
        ),
        pytest.param(
            lambda t: kept.append(next(iter([_started(_suspended(t))]))),
            f"{__name__}.kept[0] -> generator _suspended (suspended), local value",
            id="generator",
        ),
    ],
)
def test_each_root_and_step_is_named(plant: Any, expected: str) -> None:
    target = Target()
    plant(target)
    try:
        assert expected in _chains(target)
    finally:
        Registry.slot_holder = None


def _started(generator: Iterator[int]) -> Iterator[int]:
    next(generator)
    return generator


def test_a_running_frame_local_is_a_root() -> None:
    target = Target()
    (chain,) = find_referrers(target)
    assert chain.root == "frame"
    assert str(chain).startswith("test_a_running_frame_local_is_a_root() in test_holder_search.py:")
    assert str(chain).endswith(", local target")


def test_the_exception_being_handled_is_a_root() -> None:
    def fail(value: object) -> None:
        raise ValueError("inference failed")

    def search() -> list[ReferrerChain]:
        try:
            fail(Target())
        except ValueError:
            return find_holders([_frame_local_of_traceback()])
        raise AssertionError("unreachable")

    chains = search()
    assert chains[0].root == "traceback"
    assert str(chains[0]).startswith("the exception being handled -> ValueError.__traceback__")


def _frame_local_of_traceback() -> object:
    import sys

    tb = sys.exc_info()[2]
    assert tb is not None
    while tb.tb_next is not None:
        tb = tb.tb_next
    return tb.tb_frame.f_locals["value"]


class Deep(torch.nn.Module):
    def __init__(self, depth: int) -> None:
        super().__init__()
        self.inner = Deep(depth - 1) if depth else torch.nn.Linear(2, 2)


def test_a_tensor_deep_in_a_module_tree_is_traced_to_the_top_in_few_scans() -> None:
    kept.append(Deep(25))
    weight = kept[0]
    for _ in range(26):
        weight = weight.inner
    weight = weight.weight
    # Through the gc alone, each module would cost two levels (the module, its dict).
    (chain,) = _global_chains(weight, max_depth=3)
    assert chain == " -> ".join([f"{__name__}.kept[0]", *["Deep.inner"] * 26, "Linear.weight"])


def test_a_weight_held_only_by_an_autograd_graph_is_traced_to_the_output() -> None:
    embedding = torch.nn.Embedding(16, 8)
    head = torch.nn.Linear(8, 16, bias=False)
    head.weight = embedding.weight  # tied, as in GPT-2 and Whisper
    kept.append({"logits": head(torch.relu(embedding(torch.tensor([1, 2]))))})
    weight = embedding.weight
    del embedding, head
    gc.collect()
    chains = [str(c) for c in find_referrers(weight)]
    # The weight's only Python holders are this frame and the graph (C++).
    assert any(
        c.startswith(f"{__name__}.kept[0]['logits'] -> Tensor.grad_fn -> MmBackward0 -> ... ->")
        and c.endswith("AccumulateGrad.variable")
        for c in chains
    ), chains


def test_several_targets_share_each_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = Target(), Target()
    table["a"] = a
    kept.append([[b]])
    scans: list[int] = []
    real = gc.get_referrers
    monkeypatch.setattr(gc, "get_referrers", lambda *o: scans.append(1) or real(*o))
    alone = len(find_referrers(a)) and len(scans)
    scans.clear()
    alone += len(find_referrers(b)) and len(scans)
    scans.clear()
    chains = [str(c) for c in find_holders([a, b])]
    assert f"{__name__}.table['a']" in chains
    assert f"{__name__}.kept[0][0][0]" in chains
    assert len(scans) < alone
