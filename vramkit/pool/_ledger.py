"""A pool's running accounts: what each member is charged, and the order idle members go in.

Summing every member's bytes and sorting every candidate at each decision
made admission grow with the pool (milliseconds at 1,000 members). The
ledger keeps both as they change instead: a member that may have changed
(a lease ended, it loaded, offloaded or unloaded) is *marked*, from any
thread and without a lock; the next decision *settles* the marked members
alone, re-reading their bytes and last use. Between decisions the running
total and the order are as of the last settle, which is all a decision reads.

The order is the one :func:`vramkit.pool._eviction.eviction_order` states:
pinned models last; then, without a plan, least recently used first
(registration order among equals); with one, the models not in it (least
recently used first) before those in it, needed furthest in the future first.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from vramkit.pool._eviction import Member

__all__ = ["Ledger"]

# (pinned, last used, registration number, name): the registration number is
# unique, so names are never compared and equal last uses keep their order.
_Entry = tuple[bool, float, int, str]


class Ledger:
    """Each member's charge and place in the eviction order (the caller holds the pool's lock).

    :meth:`mark` alone may be called from any thread without the lock.
    """

    __slots__ = ("_charge", "_counter", "_entry", "_number", "_order", "dirty", "total")

    def __init__(self) -> None:
        self.total = 0  # the sum of the charges: what the members hold on the device
        self.dirty: dict[Any, None] = {}  # models marked since the last settle
        self._charge: dict[str, int] = {}
        self._entry: dict[str, _Entry] = {}  # of members with a charge, in _order
        self._order: list[_Entry] = []  # sorted: the eviction order of charged members
        self._number: dict[str, int] = {}  # registration order, for equal last uses
        self._counter = itertools.count()

    def mark(self, model: object) -> None:
        """``model`` may have changed: settle it at the next decision (any thread, no lock).

        A dict keyed by the model: setting a key is atomic, and the marks stay
        as many as the members however often a model is used between decisions.
        """
        self.dirty[model] = None

    def add(self, name: str, member: Member) -> None:
        """A new member, charged what it holds now."""
        self._charge[name] = 0
        self._number[name] = next(self._counter)
        self._place(name, member)

    def discard(self, name: str, model: object) -> None:
        """A member left the pool: it is charged nothing any more, and no mark keeps it alive."""
        self.dirty.pop(model, None)
        self.total -= self._charge.pop(name, 0)
        self._number.pop(name, None)
        self._unplace(name)

    def charge(self, name: str) -> int:
        """What ``name`` was charged at the last settle (0 for a non-member)."""
        return self._charge.get(name, 0)

    def settle(self, members: Mapping[str, Member]) -> None:
        """Re-read every marked member's bytes and last use."""
        dirty = self.dirty
        while dirty:
            try:
                model, _ = dirty.popitem()  # atomic: a mark made meanwhile stays for the loop
            except KeyError:
                break
            name = model.name
            member = members.get(name)
            if member is None or member.model is not model:
                continue  # left the pool since it was marked
            self._place(name, member)

    def ordered(self, members: Mapping[str, Member], plan: Sequence[str]) -> Iterator[Member]:
        """Charged members in eviction order (as of the last settle); the caller filters idle ones.

        Lazy: a caller that has found enough victims stops walking.
        """
        if not plan:
            for entry in self._order:
                yield members[entry[3]]
            return
        next_use: dict[str, int] = {}
        for index, name in enumerate(plan):
            next_use.setdefault(name, index)
        planned: list[_Entry] = []
        pinned_group = False
        for entry in self._order:
            if entry[0] is not pinned_group:  # the unpinned are done: their planned ones go now
                yield from self._furthest_first(members, planned, next_use)
                planned = []
                pinned_group = True
            if entry[3] in next_use:
                planned.append(entry)
            else:
                yield members[entry[3]]
        yield from self._furthest_first(members, planned, next_use)

    @staticmethod
    def _furthest_first(
        members: Mapping[str, Member], planned: list[_Entry], next_use: Mapping[str, int]
    ) -> Iterator[Member]:
        for entry in sorted(planned, key=lambda e: -next_use[e[3]]):
            yield members[entry[3]]

    def _place(self, name: str, member: Member) -> None:
        """Charge ``member`` what it holds now and put it where its last use says."""
        model = member.model
        charge = model.device_bytes
        self.total += charge - self._charge.get(name, 0)
        self._charge[name] = charge
        self._unplace(name)
        if charge > 0:
            entry = (member.pinned, model.stats.last_used or 0.0, self._number[name], name)
            bisect.insort(self._order, entry)
            self._entry[name] = entry

    def _unplace(self, name: str) -> None:
        entry = self._entry.pop(name, None)
        if entry is not None:
            del self._order[bisect.bisect_left(self._order, entry)]
