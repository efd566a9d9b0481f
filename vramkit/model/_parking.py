"""Where an offloaded model's weights wait, in one record that stays on the model.

A ``ManagedModel`` keeps one :class:`Parking`: the tier state while it is
``OFFLOADED`` (host copies, or the file its weights went to, and the slots
they come back into) and the disk file its last wake came from, reusable for
a cheap re-offload while the weights are unchanged. The record stays on the
model through every transition, so its tier can be read while an unload or a
tier change is under way; the tier functions themselves
(:mod:`vramkit.model.tiers`) work on the explicit data this record hands them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from vramkit.model import tiers
from vramkit.model.reports import ModelState

if TYPE_CHECKING:
    from vramkit.devices import Device
    from vramkit.model.reports import ModelStats
    from vramkit.model.tiers import OffloadReport, Tier, TierCost, WakeReport

__all__ = ["Parking"]


class Parking:
    """The one record of where a model's weights are parked (see the module's docstring)."""

    __slots__ = ("file", "state")

    def __init__(self) -> None:
        self.state: tiers._Offloaded | None = None  # while OFFLOADED
        self.file: tiers._DiskCache | None = None  # the file a disk wake came from

    @property
    def tier(self) -> Tier | None:
        """``"cpu"`` or ``"disk"`` while the weights are parked there, else ``None``."""
        state = self.state
        return None if state is None else state.tier

    @property
    def rebuilds(self) -> bool:
        """Whether waking must run the loader: nothing parked, or an object that was dropped."""
        return self.state is None or self.state.method == "rebuild"

    def device_bytes(self, state: ModelState, size: int, *, on_host: bool, residue: int = 0) -> int:
        """Of a model's ``size`` bytes in ``state``, those on its device now.

        Transitional states count what is really there: a model unloading (or
        switching tiers) from a parked state holds only the ``residue`` its
        tier leaves on the device (an isolated model's worker process), one
        waking nothing more yet. On the host the cpu tier keeps the weights
        where they were, so a model parked there still counts.
        """
        in_place = self.tier == "cpu" and on_host
        if state is ModelState.READY:
            return size
        if state in (ModelState.UNLOADING, ModelState.OFFLOADING):
            return size if self.tier is None or in_place else residue
        if state in (ModelState.OFFLOADED, ModelState.WAKING):
            return size if in_place else residue
        return 0

    def wakes_before_moving_to(self, tier: Tier) -> bool:
        """Whether a parked model must wake before it can park in ``tier``.

        Only weights in host RAM move on to disk directly; anything else (disk
        to cpu, a dropped object) wakes first.
        """
        state = self.state
        return state is not None and not (state.method == "move" and tier == "disk")

    def park(
        self,
        owner: tiers.Owner,
        obj: object,
        tier: Tier,
        directory: Path,
        message: str,
        *,
        rewrite: bool,
    ) -> OffloadReport:
        """Move ``obj``'s weights to ``tier``; on failure the object and this record are unchanged.

        From the cpu tier the weights are already in host RAM: they go to disk
        from there, without a round trip through the device, and the host
        copies are freed once the file holds them. ``message`` is what a use of
        the object's tensors raises while they are away.
        """
        previous = self.state
        state, report, self.file = tiers.offload_object(
            owner,
            obj,
            tier,
            directory,
            message=message,
            rewrite=rewrite,
            previous=previous,
            file=self.file,
        )
        if previous is not None:
            tiers.release_host_copies(previous)
        self.state = state
        return report

    def unpark(self, name: str, device: Device) -> WakeReport:
        """Bring the weights back into the model's object; on failure nothing changed.

        Raises:
            OSError, RuntimeError: The file is missing or unreadable, or the
                device ran out of memory (see :func:`vramkit.model.tiers.wake_object`).
        """
        assert self.state is not None  # parked: checked by rebuilds
        report, file = tiers.wake_object(name, device, self.state)
        if file is not None:
            self.file = file  # kept for a cheap re-offload while unchanged
        self.state = None
        return report

    def release(self) -> None:
        """Free what the record holds (host copies, pinned memory, files); its tier stays known."""
        tiers.discard(self.state, self.file)
        self.file = None

    def clear(self) -> None:
        """Forget the parked state once the model is unloaded or rebuilt (after :meth:`release`)."""
        self.state = None

    def costs(self, stats: ModelStats, *, on_host: bool) -> dict[str, TierCost]:
        """What each way of freeing the device would cost (see :func:`tiers.tier_costs`)."""
        return tiers.tier_costs(stats, on_host=on_host, file=self.file)
