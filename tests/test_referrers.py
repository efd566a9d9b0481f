"""find_referrers, directly: each kind of holder is named as a readable chain from its root."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vramkit import ReferrerChain, find_referrers


class Payload:
    """A target that fails the test if the search ever compares or hashes it."""

    def __eq__(self, other: object) -> bool:
        raise AssertionError("find_referrers compared a foreign object")

    __hash__ = None  # type: ignore[assignment]


held: Payload | None = None
in_a_list: list[object] = []
in_a_dict: dict[str, object] = {}
kept_errors: list[BaseException] = []


@pytest.fixture(autouse=True)
def _empty_holders() -> Iterator[None]:
    global held
    yield
    held = None
    in_a_list.clear()
    in_a_dict.clear()
    kept_errors.clear()


# The search also stops after `seconds`; these tests bound it by depth and objects only,
# so that a loaded machine cannot turn a chain into "holder not found".
UNHURRIED = 3600.0


def _global_chains(target: object) -> list[str]:
    return [str(c) for c in find_referrers(target, seconds=UNHURRIED) if c.root == "module global"]


def test_a_module_global_is_named() -> None:
    global held
    target = Payload()
    held = target
    assert _global_chains(target) == [f"{__name__}.held"]


def test_a_list_index_is_glued_to_its_list() -> None:
    target = Payload()
    in_a_list.extend([0, 1, target])
    assert _global_chains(target) == [f"{__name__}.in_a_list[2]"]


def test_a_dict_key_is_named() -> None:
    target = Payload()
    in_a_dict["run"] = target
    assert _global_chains(target) == [f"{__name__}.in_a_dict['run']"]


def _make(model: object) -> Callable[[], object]:
    def predict() -> object:
        return model

    return predict


def test_a_closure_names_its_function_and_variable() -> None:
    target = Payload()
    in_a_dict["handler"] = _make(target)
    assert _global_chains(target) == [
        f"{__name__}.in_a_dict['handler'] -> closure of _make.<locals>.predict (variable 'model')"
    ]


def _fail(obj: object) -> None:
    raise ValueError("boom")


def test_a_traceback_names_the_finished_frame() -> None:
    target = Payload()
    try:
        _fail(target)
    except ValueError as error:
        kept_errors.append(error)
    (chain,) = _global_chains(target)
    assert chain.startswith(f"{__name__}.kept_errors[0] -> ValueError.__traceback__ -> traceback")
    assert chain.endswith("(finished), local obj")
    assert "_fail() in test_referrers.py:" in chain


def test_a_running_frame_is_a_root() -> None:
    target = Payload()
    chains = find_referrers(target, seconds=UNHURRIED)
    assert [c.root for c in chains] == ["frame"]
    assert "test_a_running_frame_is_a_root() in test_referrers.py:" in str(chains[0])
    assert str(chains[0]).endswith(", local target")
    assert isinstance(chains[0], ReferrerChain)


def test_ignored_holders_do_not_count() -> None:
    target = Payload()
    in_a_list.append(target)
    in_a_dict["run"] = target
    assert sorted(_global_chains(target)) == [
        f"{__name__}.in_a_dict['run']",
        f"{__name__}.in_a_list[0]",
    ]
    chains = [str(c) for c in find_referrers(target, ignore=[in_a_list], seconds=UNHURRIED)]
    assert f"{__name__}.in_a_dict['run']" in chains
    assert not any("in_a_list" in c for c in chains)


def test_nothing_held_gives_no_chain() -> None:
    def build() -> Any:
        return find_referrers(Payload(), seconds=UNHURRIED)

    assert build() == []


def test_chains_are_bounded_by_count() -> None:
    target = Payload()
    in_a_list.extend([target] * 5)
    in_a_dict.update({f"k{i}": target for i in range(5)})
    assert len(find_referrers(target, max_chains=2, seconds=UNHURRIED)) <= 2
