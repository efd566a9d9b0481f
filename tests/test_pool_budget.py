"""A pool's budget: one small class per way of saying it, asked the same four questions.

The device's numbers come from a scripted FakeDevice: what is tested here is
the budget's arithmetic, not a backend.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from vramkit.devices import resolve_device
from vramkit.errors import InvalidArgumentError, ModelStateError
from vramkit.pool._budget import (
    BytesBudget,
    Charges,
    DriverBudget,
    FractionBudget,
    parse_budget,
)
from vramkit.testing.fake import FakeDevice

GiB = 1 << 30


@pytest.fixture
def fake() -> Iterator[FakeDevice]:
    device = FakeDevice("budgetfake", total="8GiB")
    with device.install():
        device.set_others("2GiB")  # another process: only the driver's numbers see it
        yield device


@pytest.mark.parametrize(
    ("given", "kind"),
    [(None, DriverBudget), (0.5, FractionBudget), (GiB, BytesBudget), ("1GiB", BytesBudget)],
)
def test_each_way_of_saying_a_budget_is_its_own_class(given: object, kind: type) -> None:
    assert isinstance(parse_budget(given), kind)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "match"),
    [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (0, "more than 0 bytes"), ("-1GiB", "budget")],
)
def test_a_budget_that_means_nothing_is_refused(given: object, match: str) -> None:
    with pytest.raises(InvalidArgumentError, match=match):
        parse_budget(given)  # type: ignore[arg-type]


def test_bytes_and_fractions_count_the_pool_s_own_charges(fake: FakeDevice) -> None:
    device = resolve_device("budgetfake:0")
    charges = Charges(resident=GiB, charged=3 * GiB, own=GiB)
    fixed = BytesBudget(4 * GiB)
    assert fixed.limit(device, GiB) == fixed.whole(device, GiB) == 4 * GiB
    assert fixed.room(device, charges) == GiB
    assert fixed.overdrawn(device, Charges(GiB, 5 * GiB)) == GiB
    half = FractionBudget(0.5)
    assert half.limit(device, 0) == 4 * GiB  # of the device's 8 GiB total
    assert half.room(device, charges) == GiB


def test_the_driver_budget_is_what_is_free_plus_what_the_pool_holds(fake: FakeDevice) -> None:
    device = resolve_device("budgetfake:0")
    fake.allocate("1GiB")  # the pool's model
    budget = DriverBudget()
    assert budget.limit(device, resident=GiB) == 6 * GiB  # 8 - 2 (others) - 1 (ours) + 1
    assert budget.whole(device, GiB) == 8 * GiB  # the device's total
    assert budget.room(device, Charges(GiB, GiB, own=GiB, reserved=GiB // 2)) == 5.5 * GiB
    assert budget.overdrawn(device, Charges(GiB, 100 * GiB)) == 0  # loads show in the driver


def test_a_device_without_the_numbers_a_budget_needs_says_so(fake: FakeDevice) -> None:
    device = resolve_device("budgetfake:0")
    fake.script({"free_bytes": None}, {"total_bytes": None})
    with pytest.raises(ModelStateError, match="reports no free memory"):
        DriverBudget().limit(device, 0)
    with pytest.raises(ModelStateError, match="reports no total"):
        FractionBudget(0.5).limit(device, 0)
