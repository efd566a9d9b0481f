"""A pool's running accounts agree with summing and sorting every member, as the pool once did.

The pool keeps what each member is charged and the eviction order as they
change (``vramkit.pool._ledger``) instead of walking every member at each
decision. Two proofs that nothing changed: on random pools of stand-in
members (the choice is policy, so stand-ins are enough), the victims and
candidates equal those of the plain rule (:func:`eviction_order` over every
idle member, then :func:`fewest_covering`); and on a real pool of torch
models, the running total equals the sum of what every member holds after
random registrations, leases, evictions, offloads and removals.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vramkit import ModelPool, ModelState
from vramkit.pool._eviction import Member, eviction_order, fewest_covering


@dataclass
class Stats:
    last_used: float | None


@dataclass(eq=False)
class StandIn:
    """The parts of a ManagedModel a pool's eviction choice reads."""

    name: str
    device_bytes: int
    last_used: float | None
    leases: int = 0
    state: ModelState = ModelState.READY
    _lease_coming: bool = False
    stats: Stats = field(init=False)

    def __post_init__(self) -> None:
        self.stats = Stats(self.last_used)

    def touch(self, last_used: float | None, device_bytes: int) -> None:
        self.stats = Stats(last_used)
        self.device_bytes = device_bytes


# Mostly evictable, so that orders of several candidates are compared.
STATES = [ModelState.READY] * 3 + [ModelState.OFFLOADED, ModelState.UNLOADED, ModelState.LOADING]

member_st = st.fixed_dictionaries(
    {
        "bytes": st.sampled_from([0, 1, 2, 3, 5, 8, 13]),
        "last": st.one_of(st.none(), st.sampled_from([1.0, 2.0, 3.0, 4.0])),  # ties on purpose
        "pinned": st.booleans(),
        "leases": st.sampled_from([0] * 5 + [1]),
        "state": st.sampled_from(STATES),
        "coming": st.sampled_from([False] * 5 + [True]),
    }
)


def _idle(pool: ModelPool, exclude: str) -> list[Member]:
    """The plain rule's candidates: every member looked at, then sorted."""
    idle = [
        m
        for n, m in pool._members.items()
        if n != exclude
        and n not in pool._evicting
        and n not in pool._reserved
        and m.model.leases == 0
        and not m.model._lease_coming
        and m.model.state in (ModelState.READY, ModelState.OFFLOADED)
        and m.model.device_bytes > 0
    ]
    return eviction_order(idle, pool._plan.names())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    members=st.lists(member_st, min_size=2, max_size=8),
    changes=st.lists(
        st.tuples(
            st.integers(0, 9),
            st.one_of(st.none(), st.sampled_from([0.5, 2.0, 4.0, 9.0])),
            st.sampled_from([0, 1, 4, 8]),
        ),
        max_size=8,
    ),
    plan=st.lists(st.integers(0, 7), max_size=8),
    evicting=st.sets(st.integers(0, 9), max_size=2),
    reserved=st.sets(st.integers(0, 9), max_size=2),
    exclude=st.integers(0, 12),
    shortfall=st.integers(1, 30),
)
def test_victims_and_candidates_equal_those_of_the_plain_rule(
    members: list[dict[str, Any]],
    changes: list[tuple[int, float | None, int]],
    plan: list[int],
    evicting: set[int],
    reserved: set[int],
    exclude: int,
    shortfall: int,
) -> None:
    pool = ModelPool("cpu", budget="1GiB", start_threads=False)
    try:
        stand_ins = []
        for i, spec in enumerate(members):
            model = StandIn(f"m{i}", spec["bytes"], spec["last"], spec["leases"], spec["state"])
            model._lease_coming = spec["coming"]
            stand_ins.append(model)
            member = pool._members[model.name] = Member(model, spec["pinned"])  # type: ignore[arg-type]
            pool._ledger.add(model.name, member)
        # Members change between decisions and say so, as a model's _freed does.
        for index, last, size in changes:
            if index < len(stand_ins):
                stand_ins[index].touch(last, size)
                pool._ledger.mark(stand_ins[index])
        names = [m.name for m in stand_ins]
        pool._plan.replace([names[i] for i in plan if i < len(names)])
        pool._evicting.update(names[i] for i in evicting if i < len(names))
        pool._reserved.update({names[i]: 1 for i in reserved if i < len(names)})
        excluded = f"m{exclude}"

        expected = _idle(pool, excluded)
        assert pool._candidates(exclude=excluded) == expected
        assert pool._pick(shortfall, exclude=excluded) == fewest_covering(
            expected, shortfall, pool._size
        )
        resident = sum(m.device_bytes for m in stand_ins if m.name not in pool._reserved)
        assert pool._charged_resident() == resident
    finally:
        pool._members.clear()  # stand-ins: nothing to unload
        pool.close()


MiB = 1024**2


def _layer() -> torch.nn.Module:
    return torch.nn.Linear(256, 256)  # 257 KiB of float32 weights and bias


LAYER = (256 * 256 + 256) * 4

operation_st = st.tuples(
    st.sampled_from(["register", "use", "evict_idle", "offload", "remove", "budget"]),
    st.integers(0, 3),
)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(operations=st.lists(operation_st, min_size=4, max_size=10))
def test_running_total_equals_the_sum_of_the_members(operations: list[tuple[str, int]]) -> None:
    with ModelPool(
        "cpu", budget=3 * LAYER, headroom=0, evict_to="unload", timeout=0.5, start_threads=False
    ) as pool:
        for index in range(3):
            pool.register(f"m{index}", _layer, size_hint=LAYER, inference_mode=False)
        for op, index in operations:
            name = f"m{index}"
            if op == "register" and name not in pool:
                pool.register(name, _layer, size_hint=LAYER, inference_mode=False)
            elif op == "use" and name in pool:
                with pool.use(name) as layer:
                    layer(torch.ones(1, 256))
            elif op == "evict_idle":
                pool.evict_idle()
            elif op == "offload" and name in pool and pool[name].state is ModelState.READY:
                pool[name].offload("cpu")
            elif op == "remove" and name in pool:
                pool.remove(name)
            elif op == "budget":
                pool.set_budget((1 + index) * LAYER)
            held = sum(model.device_bytes for model in pool)
            assert pool._charged() == held
            assert pool.status().charged_bytes == held
