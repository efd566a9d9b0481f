"""Whom a pool evicts, and what each model is charged: its choices, on explicit data.

A model is charged what it really holds on the device (``ManagedModel.device_bytes``);
idle models are evicted pinned ones last, otherwise least recently used first
or, given a plan of what comes next, the one needed furthest in the future
(:func:`eviction_order`); of those, the fewest that cover the shortfall go
(:func:`fewest_covering`).
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vramkit import events
from vramkit._units import format_bytes
from vramkit.errors import ModelBusyError, OffloadError
from vramkit.model import ManagedModel

__all__ = [
    "Member",
    "Plan",
    "describe",
    "evict",
    "eviction_order",
    "fewest_covering",
    "holders",
]


@dataclass(slots=True)
class Member:
    """A model in a pool, and whether it is pinned (evicted only after every other)."""

    model: ManagedModel[Any]
    pinned: bool


class Plan:
    """The order the next models will be used in, for Belady eviction (``ModelPool.plan``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        # The names still planned, next first; read without the lock only to see
        # whether any are (a lease through the pool asks at every use).
        self.pending: collections.deque[str] = collections.deque()

    def replace(self, names: Sequence[str]) -> None:
        """Plan ``names``, in order, instead of what was planned."""
        with self._lock:
            self.pending = collections.deque(names)

    def advance(self, name: str) -> None:
        """``name`` is being used: the plan moves on if it was next."""
        with self._lock:
            if self.pending and self.pending[0] == name:
                self.pending.popleft()

    def names(self) -> list[str]:
        """What is planned, next first."""
        with self._lock:
            return list(self.pending)


def eviction_order(idle: Sequence[Member], plan: Sequence[str]) -> list[Member]:
    """``idle`` in the order to evict them: pinned last; then, with a plan, Belady's choice.

    Without a plan, the least recently used goes first; with one, the model
    needed furthest in the future (or never).
    """

    def next_use(member: Member) -> float:
        try:
            return float(plan.index(member.model.name))
        except ValueError:
            return math.inf

    def key(member: Member) -> tuple[bool, float, float]:
        last = member.model.stats.last_used or 0.0
        if plan:  # Belady: furthest next use first
            return (member.pinned, -next_use(member), last)
        return (member.pinned, 0.0, last)  # least recently used first

    return sorted(idle, key=key)


def fewest_covering(
    ordered: Iterable[Member], shortfall: int, size: Callable[[Member], int]
) -> list[Member] | None:
    """The fewest of ``ordered`` (in eviction order) whose eviction covers ``shortfall``.

    ``ordered`` is walked only as far as it takes to cover the shortfall.

    Returns:
        The victims, or ``None`` when even all of them would not cover it.
    """
    chosen: list[Member] = []
    freed = 0
    for member in ordered:
        if freed >= shortfall:
            break
        chosen.append(member)
        freed += size(member)
    if freed < shortfall or not chosen:
        return None
    # Spare any victim the others already cover, the ones needed soonest first:
    # evicting a small model that does not close the gap only costs a reload.
    for member in reversed(list(chosen)):
        bytes_ = size(member)
        if freed - bytes_ >= shortfall:
            chosen.remove(member)
            freed -= bytes_
    return chosen


def describe(
    members: Mapping[str, Member], reserved: Mapping[str, int], size: Callable[[Member], int]
) -> str:
    """Every model's state, tier and charge, for the debug log: ``asr READY 1048576, ...``."""
    return ", ".join(
        f"{name} {member.model.state.value}"
        + (f"({member.model.tier})" if member.model.tier else "")
        + f" {reserved.get(name, size(member))}"
        for name, member in members.items()
    )


def holders(
    members: Mapping[str, Member], reserved: Mapping[str, int], size: Callable[[Member], int]
) -> str:
    """Who holds what, for a refusal: ``asr 1.0 GiB (2 leases), llm 4.0 GiB (idle)``."""
    found = []
    for name, member in members.items():
        held = reserved.get(name, size(member))
        if not held:
            continue
        leases = member.model.leases
        why = (
            f"{leases} leases"
            if leases
            else "loading"
            if name in reserved
            else "pinned"
            if member.pinned
            else "idle"
        )
        found.append(f"{name} {format_bytes(held)} ({why})")
    return ", ".join(found) or "nothing"


def evict(model: ManagedModel[Any], evict_to: str, *, reason: str) -> bool:
    """Offload or unload one idle model and say so in an ``evict`` event.

    Args:
        model: The model.
        evict_to: ``"auto"`` (the model's cheapest tier, from its measured
            costs), ``"cpu"``, ``"disk"`` or ``"unload"``.
        reason: Why, for the event.

    Returns:
        Whether it left the device; ``False`` when a lease arrived in between.
    """
    tier = model.choose_tier() if evict_to == "auto" else evict_to
    if tier == model.tier:
        tier = "unload"  # already there, and what it still holds is wanted: all of it
    before = model.state
    started = time.perf_counter()
    try:
        if tier in ("cpu", "disk"):
            try:
                model.offload(tier)
            except OffloadError as exc:
                # The tier could not be written (disk full...): the model is
                # still READY and the room is still needed, so unload it.
                # The error names the model already; say it once.
                why = str(exc).removeprefix(f"{model.name}: ")
                events.logger.warning(
                    "%s: evicting to the %s tier failed (%s); unloading instead",
                    model.name,
                    tier,
                    why,
                )
                tier = "unload"
                model.unload()
        else:
            model.unload()
    except ModelBusyError:
        return False  # a lease arrived in between: it is not idle any more
    events.emit(
        events.Event(
            "evict",
            model.name,
            str(model.device),
            before.value,
            model.state.value,
            seconds=time.perf_counter() - started,
            bytes=model.size_bytes,
            detail={"tier": tier, "reason": reason},
        )
    )
    return True
