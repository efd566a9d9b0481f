"""What a pool reports about itself: one line per model, and its accounting."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vramkit._units import format_bytes, format_part_of
from vramkit.model import ManagedModel

__all__ = ["PoolStatus", "PooledModel"]


@dataclass(frozen=True, slots=True)
class PooledModel:
    """One model's line in :meth:`ModelPool.status`."""

    name: str
    state: str
    tier: str | None
    device_bytes: int
    size_bytes: int | None
    leases: int
    idle_seconds: float | None
    pinned: bool
    keep_alive: float | None

    @classmethod
    def of(cls, model: ManagedModel[Any], pinned: bool) -> PooledModel:
        """The line of ``model`` as it stands now."""
        return cls(
            name=model.name,
            state=model.state.value,
            tier=model.tier,
            device_bytes=model.device_bytes,
            size_bytes=model.expected_bytes,
            leases=model.leases,
            idle_seconds=model.idle_seconds,
            pinned=pinned,
            keep_alive=model.keep_alive,
        )


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A pool's accounting at one moment.

    Attributes:
        name: The pool's name.
        device: Its device.
        budget_bytes: The budget now (for ``budget=None``, the driver's free
            memory plus what the pool's models hold).
        charged_bytes: Bytes the pool counts against the budget: resident
            models plus reservations of loads in progress.
        headroom_bytes: Bytes kept free beyond each reservation.
        peak_charged_bytes: Highest ``charged_bytes`` seen.
        models: One :class:`PooledModel` per model, in registration order.
        loads: Loads and wakes the pool admitted.
        evictions: Models the pool evicted (offloaded or unloaded) to make room.
    """

    name: str
    device: str
    budget_bytes: int
    charged_bytes: int
    headroom_bytes: int
    peak_charged_bytes: int
    models: tuple[PooledModel, ...]
    loads: int
    evictions: int

    def to_dict(self) -> dict[str, Any]:
        """The status as JSON-ready data (bytes as ints, ``models`` as a list of dicts)."""
        # Not dataclasses.asdict: its deep copies cost more than the status itself.
        data = {name: getattr(self, name) for name in _POOL_FIELDS}
        data["models"] = [{name: getattr(m, name) for name in _MODEL_FIELDS} for m in self.models]
        return data

    def __str__(self) -> str:
        lines = [
            f"pool {self.name} on {self.device}: "
            f"{format_part_of(self.charged_bytes, max(self.budget_bytes, 1))} budget used "
            f"(peak {format_bytes(self.peak_charged_bytes)}, headroom "
            f"{format_bytes(self.headroom_bytes)}), {self.loads} loads, "
            f"{self.evictions} evictions"
        ]
        header = ("model", "state", "on device", "size", "leases", "idle", "keep-alive")
        rows = [header]
        for m in self.models:
            state = m.state + (f" ({m.tier})" if m.tier else "") + (" pinned" if m.pinned else "")
            rows.append(
                (
                    m.name,
                    state,
                    format_bytes(m.device_bytes),
                    format_bytes(m.size_bytes),
                    str(m.leases),
                    "-" if m.idle_seconds is None else f"{m.idle_seconds:.1f} s",
                    "never" if m.keep_alive is None else f"{m.keep_alive:g} s",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        lines += [
            "  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ]
        return "\n".join(lines)


_MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(PooledModel))
_POOL_FIELDS = tuple(f.name for f in dataclasses.fields(PoolStatus) if f.name != "models")
