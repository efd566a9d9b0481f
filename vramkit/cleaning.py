"""One cleanup path for every backend: collect, synchronize, empty caches, trim the heap.

>>> import vramkit
>>> report = vramkit.cleanup("cpu")
>>> report.seconds >= 0
True

Cleanup is a policy, not a reflex: each ``empty_cache`` throws away blocks the
caching allocator would have reused, so call it between batches or models, not
after every tensor.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from vramkit._units import check_flag, format_bytes
from vramkit.devices import DeviceLike, get_backend
from vramkit.devices.cpu import malloc_trim
from vramkit.errors import InvalidArgumentError
from vramkit.memory import MemoryDelta, MemorySnapshot, read_devices, target_devices

__all__ = ["CleanupReport", "cleanup"]


@dataclass(frozen=True, slots=True)
class CleanupReport:
    """What a cleanup did and what it gave back.

    Attributes:
        before: Snapshot taken before cleaning.
        after: Snapshot taken after.
        collected: Objects the garbage collector freed (unreachable cycles).
        trimmed: Whether ``malloc_trim(0)`` ran (glibc hosts only).
        steps: The steps taken, in order, such as ``("gc", "synchronize cuda:0", ...)``.
        seconds: Wall time of the whole cleanup.
    """

    before: MemorySnapshot
    after: MemorySnapshot
    collected: int
    trimmed: bool
    steps: tuple[str, ...]
    seconds: float

    @property
    def delta(self) -> MemoryDelta:
        """``after - before``: negative numbers are memory given back."""
        return self.after - self.before

    def freed_bytes(self, device: str, layer: str = "headline") -> int | None:
        """Bytes given back on ``device`` in one layer (positive means freed).

        Args:
            device: A device name present in both snapshots, such as ``"cpu"``.
            layer: ``"allocated"``, ``"reserved"``, ``"used"`` (device-wide, per
                the driver or OS), ``"process"`` (this process per the driver or
                RSS), or ``"headline"`` (allocated where counted, else process).

        Returns:
            Bytes freed, or ``None`` where that layer cannot be read here.
        """
        change = self.delta[device]
        value = (
            change.headline_bytes
            if layer == "headline"
            else getattr(change, f"{layer}_bytes" if layer != "process" else "process_used_bytes")
        )
        return None if value is None else -value

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of the report."""
        return {
            "collected": self.collected,
            "trimmed": self.trimmed,
            "steps": list(self.steps),
            "seconds": self.seconds,
            "before": self.before.to_dict(),
            "after": self.after.to_dict(),
            "delta": self.delta.to_dict(),
        }

    def __str__(self) -> str:
        lines = [f"cleanup in {self.seconds * 1000:.1f} ms, {self.collected} objects collected"]
        for name in self.delta:
            freed = {
                layer: self.freed_bytes(name, layer)
                for layer in ("allocated", "reserved", "process")
            }
            shown = [f"{k} {format_bytes(v)}" for k, v in freed.items() if v is not None]
            lines.append(f"  {name:<7} freed " + (" · ".join(shown) or "n/a"))
        return "\n".join(lines)


def cleanup(
    device: DeviceLike | Iterable[DeviceLike] | None = None,
    *,
    gc_collect: bool = True,
    trim: bool = True,
    generation: int = 2,
) -> CleanupReport:
    """Free what can be freed and say how much came back.

    In order: ``gc.collect(generation)`` (so tensors held only by reference cycles die),
    then per device ``synchronize`` (so deferred frees happen) and the backend's
    ``empty_cache`` (CUDA also ``ipc_collect``; MPS ``torch.mps.empty_cache``;
    host ``malloc_trim(0)``), and ``malloc_trim(0)`` once more for the host heap
    that accelerator work leaves behind. No step creates a CUDA context.

    Args:
        device: ``None`` for every available device, or one or several names.
        gc_collect: Run the garbage collector first.
        trim: Return free heap pages to the OS on glibc hosts.
        generation: The oldest generation collected: ``2`` (the default) is a
            full collection, whose cost grows with the whole heap (about 0.2 s
            with FunASR loaded); ``0`` or ``1`` collect only the objects made
            since the last collections, which costs microseconds and frees the
            cycles a batch just dropped, but not cycles that lived long enough
            to reach the oldest generation.

    Returns:
        A :class:`CleanupReport` with snapshots before and after.

    Raises:
        InvalidArgumentError: ``generation`` is not 0, 1 or 2.
    """
    check_flag(gc_collect, "gc_collect")
    check_flag(trim, "trim")
    if isinstance(generation, bool) or not isinstance(generation, int) or not 0 <= generation <= 2:
        raise InvalidArgumentError(
            f"generation must be 0, 1 or 2 (the oldest gc generation collected); got {generation!r}"
        )
    started = time.perf_counter()
    devices = target_devices(device)
    before = read_devices(devices)
    steps: list[str] = []
    collected = 0
    if gc_collect:
        collected = gc.collect(generation)
        steps.append("gc" if generation == 2 else f"gc young ({generation})")
    for target in devices:
        if target.kind == "cpu":
            continue  # the host's "cache" is the heap: trimmed once below
        backend = get_backend(target.kind)
        backend.synchronize(target.index or 0)
        backend.empty_cache(target.index or 0)
        steps.append(f"empty_cache {target}")
    # Accelerator work leaves host heap behind too (staging buffers, pickles):
    # trim even when only an accelerator was asked for.
    trimmed = trim and malloc_trim()
    if trimmed:
        steps.append("malloc_trim")
    after = read_devices(devices)
    return CleanupReport(
        before=before,
        after=after,
        collected=collected,
        trimmed=trimmed,
        steps=tuple(steps),
        seconds=time.perf_counter() - started,
    )
