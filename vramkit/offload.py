"""Deprecated alias of :mod:`vramkit.model.tiers`, kept for one release.

The offload tiers moved into the model package; import their reports from
``vramkit.model.tiers`` (or use them through ``ManagedModel.offload()``,
``wake()`` and ``tier_costs()``).
"""

from __future__ import annotations

from vramkit.model.tiers import OffloadReport, Tier, TierCost, WakeReport, default_offload_dir

__all__ = [
    "OffloadReport",
    "Tier",
    "TierCost",
    "WakeReport",
    "default_offload_dir",
]
