"""What a session saw: :class:`SessionReport`, its verdicts and the tensors still held."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from vramkit._units import format_bytes
from vramkit.memory import MemoryDelta, MemorySnapshot, driver_layer, usage_layer
from vramkit.tensors import TensorCensus, TensorInfo

if TYPE_CHECKING:
    from vramkit.cleaning import CleanupReport
    from vramkit.referrers import ReferrerChain

__all__ = ["HeldTensor", "LeakCheck", "SessionReport", "Verdict"]

LeakCheck = Literal["raise", "warn"]
"""What a failed leak check does: raise :class:`~vramkit.errors.VramLeakError` or warn."""

Verdict = Literal["clean", "leak", "unverified", "unchecked"]
"""``"clean"``; ``"leak"``; ``"unverified"`` (the allocator grew, the driver does
not confirm it); ``"unchecked"`` (``leak_check=None``: numbers only, no judgement)."""

_LISTED: Final = 10  # tensors listed in a leak message


@dataclass(frozen=True, slots=True)
class HeldTensor:
    """A tensor that appeared during a session and is still alive, with who holds it.

    Attributes:
        tensor: The census entry (shape, dtype, device, bytes; a weak reference only).
        referrers: Chains from a root (module global, running frame...) down to
            the tensor, such as ``app.cache[0]``; empty when none was found.
    """

    tensor: TensorInfo
    referrers: tuple[ReferrerChain, ...]

    def describe(self) -> str:
        """The tensor's line followed by ``held by ...`` lines."""
        lines = [self.tensor.describe()]
        lines.extend(f"  held by {chain}" for chain in self.referrers)
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class SessionReport:
    """What a session saw. Bytes everywhere; ``None`` where a layer cannot be read here.

    Attributes:
        device: The device checked, such as ``"cuda:0"`` or ``"cpu"``.
        name: The session's name (a decorated function's qualified name by default).
        before: Snapshot of the device just before the block.
        after: Snapshot after the block and after any cleanup or re-check:
            what the verdict is based on.
        peak_bytes: Highest allocator reading during the block on an
            accelerator (``peak_allocated_bytes``), highest resident set size
            on the host (``process_peak_bytes``).
        cleanup: The first cleanup run on exit (``cleanup=True``: young
            generations; or a re-check of a suspected leak: a full collection),
            else ``None``.
        new_tensors: Storages on the device that appeared during the block and
            are still alive, largest first; ``None`` when no census was taken
            (``leak_check=None``).
        held: The largest few of ``new_tensors`` with their holders, searched
            only when the verdict is not ``"clean"`` and the block did not raise.
        allocator_growth_bytes: Growth of the allocator layer: ``allocated_bytes``
            on an accelerator, bytes of ``new_tensors`` on the host.
        driver_growth_bytes: Growth of this process as the driver (or the OS)
            sees it, else of the device's used bytes.
        leaked_bytes: Bytes that did not come back in the layer that decided
            the verdict (at least 0); ``None`` when unchecked.
        verdict: ``"clean"``, ``"leak"``, ``"unverified"`` or ``"unchecked"``.
        leak_check: The session's ``leak_check`` setting.
        tolerance_bytes: Allowed allocator growth.
        process_tolerance_bytes: Allowed driver growth, or ``None`` (ignored).
        checks: How many times memory was measured on exit (1 + re-checks).
        seconds: Wall time of the block itself.
        raised: ``"TypeName: message"`` when the block raised, else ``None``.
        note: Why the check could not judge, for an ``"unverified"`` verdict
            that is not the driver's (the heap was frozen or thawed while the
            block ran); else ``None``.
    """

    device: str
    name: str | None
    before: MemorySnapshot
    after: MemorySnapshot
    peak_bytes: int | None
    cleanup: CleanupReport | None
    new_tensors: TensorCensus | None
    held: tuple[HeldTensor, ...]
    allocator_growth_bytes: int | None
    driver_growth_bytes: int | None
    leaked_bytes: int | None
    verdict: Verdict
    leak_check: LeakCheck | None
    tolerance_bytes: int
    process_tolerance_bytes: int | None
    checks: int
    seconds: float
    raised: str | None
    note: str | None = None

    @property
    def delta(self) -> MemoryDelta:
        """``after - before``: what the block left behind, per field."""
        return self.after - self.before

    def message(self) -> str:
        """The readable account used in errors and warnings.

        Returns:
            :meth:`headline` (after the session's name, when it has one) and,
            for a leak or an unverified verdict, :meth:`tensor_lines`.
        """
        prefix = f"{self.name}: " if self.name else ""
        lines = [prefix + self.headline()]
        if self.verdict in ("leak", "unverified") and self.new_tensors is not None:
            lines.extend(self.tensor_lines())
        return "\n".join(lines)

    def headline(self) -> str:
        """The verdict in one line, layer by layer, with the tolerances.

        Returns:
            Such as ``leaked 32.0 MiB on cpu (live tensors +32.0 MiB, process
            +1.2 MiB, peak 225.1 MiB); tolerance 16.0 MiB``. The allocator
            layer is ``allocated`` on an accelerator and ``live tensors`` on the
            host; the driver layer is named as :data:`vramkit.memory.LAYERS` names it.
        """
        layers = self._layers()
        if self.verdict == "leak":
            head = f"leaked {format_bytes(self.leaked_bytes)} on {self.device} ({layers})"
        elif self.verdict == "unverified" and self.note is not None:
            head = f"could not check {self.device} for leaks: {self.note} ({layers})"
        elif self.verdict == "unverified":
            head = (
                f"{format_bytes(self.allocator_growth_bytes)} allocated on {self.device} "
                f"did not come back, but the driver does not confirm it ({layers}); "
                "this may be the allocator's bookkeeping rather than a leak"
            )
        else:
            head = f"{self.verdict} on {self.device} ({layers})"
        tolerances = f"tolerance {format_bytes(self.tolerance_bytes)}"
        if self.process_tolerance_bytes is not None:
            tolerances += f", process tolerance {format_bytes(self.process_tolerance_bytes)}"
        return f"{head}; {tolerances}"

    def _layers(self) -> str:
        change = self.delta[self.device]
        parts = []
        if self.allocator_growth_bytes is not None:
            label = "allocated" if usage_layer(change) == "allocated" else "live tensors"
            parts.append(f"{label} {format_bytes(self.allocator_growth_bytes, signed=True)}")
        if change.reserved_bytes is not None:
            parts.append(f"reserved {format_bytes(change.reserved_bytes, signed=True)}")
        if self.driver_growth_bytes is not None:
            label = driver_layer(change) or "driver"
            parts.append(f"{label} {format_bytes(self.driver_growth_bytes, signed=True)}")
        if self.peak_bytes is not None:
            parts.append(f"peak {format_bytes(self.peak_bytes)}")
        return ", ".join(parts) or "no comparable readings"

    def tensor_lines(self) -> list[str]:
        """The tensors that appeared and are still alive, largest first, with their holders.

        Returns:
            Indented lines: each tensor (the largest ten), then ``held by``
            lines where a holder was searched for and found; one line saying
            none were found when the census is empty; nothing without a census.
        """
        census = self.new_tensors
        if census is None:
            return []
        if not census:
            return [
                f"  no new live tensors on {self.device}: the memory is held outside "
                "Python-visible tensors (an extension's allocation, an autograd graph)"
            ]
        hinted = {h.tensor.storage_key: h for h in self.held}
        lines: list[str] = []
        for info in census[:_LISTED]:
            held = hinted.get(info.storage_key)
            lines.extend(
                "  " + line for line in (held or HeldTensor(info, ())).describe().split("\n")
            )
        if len(census) > _LISTED:
            rest = census[_LISTED:]
            lines.append(f"  ... and {len(rest)} more, {format_bytes(rest.total_bytes)}")
        return lines

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report (tensors as description lines)."""
        return {
            "device": self.device,
            "name": self.name,
            "verdict": self.verdict,
            "leak_check": self.leak_check,
            "leaked_bytes": self.leaked_bytes,
            "allocator_growth_bytes": self.allocator_growth_bytes,
            "driver_growth_bytes": self.driver_growth_bytes,
            "peak_bytes": self.peak_bytes,
            "tolerance_bytes": self.tolerance_bytes,
            "process_tolerance_bytes": self.process_tolerance_bytes,
            "checks": self.checks,
            "seconds": self.seconds,
            "raised": self.raised,
            "note": self.note,
            "new_tensors": (
                None if self.new_tensors is None else [t.describe() for t in self.new_tensors]
            ),
            "held": {h.tensor.describe(): [str(c) for c in h.referrers] for h in self.held},
            "cleanup": None if self.cleanup is None else self.cleanup.to_dict(),
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "delta": self.delta.to_dict(),
        }

    def __str__(self) -> str:
        return self.message()
