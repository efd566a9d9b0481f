"""What a managed model reports: its state, and what each load and unload did and cost."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

from vramkit._units import format_bytes
from vramkit.cleaning import CleanupReport
from vramkit.devices import DeviceMemory
from vramkit.memory import LAYERS, USAGE_LAYERS, shown_layers
from vramkit.referrers import ReferrerChain

__all__ = ["LoadReport", "ModelState", "ModelStats", "UnloadReport"]


class ModelState(str, Enum):
    """Where a :class:`ManagedModel` is in its life. Transitional states end in ``-ING``."""

    UNLOADED = "UNLOADED"
    LOADING = "LOADING"
    READY = "READY"
    OFFLOADING = "OFFLOADING"
    OFFLOADED = "OFFLOADED"
    WAKING = "WAKING"
    UNLOADING = "UNLOADING"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True, slots=True)
class LoadReport:
    """What a load took and cost.

    Attributes:
        model: The model's name.
        device: Where it was loaded.
        seconds: Wall time of the loader (and the adapter's measurement).
        size_bytes: Bytes the object holds per its adapter, else the memory it
            added on the device (or in the process, for ``cpu``).
        memory_before: The device's reading before the load.
        memory_after: The reading after.
    """

    model: str
    device: str
    seconds: float
    size_bytes: int | None
    memory_before: DeviceMemory
    memory_after: DeviceMemory

    def __str__(self) -> str:
        size = format_bytes(self.size_bytes)
        return f"loaded {self.model} on {self.device} in {self.seconds:.3f} s, {size}"


@dataclass(frozen=True, slots=True)
class UnloadReport:
    """What an unload did, and whether the memory really came back.

    Attributes:
        model: The model's name.
        device: The device it was on.
        state_before: Its state before the unload (``UNLOADED`` when there was nothing to do).
        state_after: ``UNLOADED``.
        died: Whether the model, its native handles and every storage its
            tensors used were proven dead by weak references after vramkit
            dropped its reference. ``False`` when anything still held one: the
            model, or only a view, a ``.detach()`` copy or a ``state_dict()``
            entry of a weight (they share its storage, so its bytes live).
        verified: Whether death could be checked at all (objects that cannot be
            weakly referenced cannot be proven dead).
        holders: Who held the survivors, as referrer chains (empty when ``died``).
        survivors: Short descriptions of what survived.
        neutralised_bytes: Bytes of surviving storages freed anyway (every
            tensor on them emptied and made to raise at its next use).
        held_bytes: Bytes still held after everything vramkit could do:
            storages only C++ holds that torch cannot resize (a memory-mapped
            file, numpy memory). ``0`` when all came back.
        held: One line per storage in ``held_bytes``: its bytes, device and why.
        expected_bytes: The model's size as measured at load.
        freed_bytes: Bytes given back per layer of :data:`vramkit.memory.LAYERS`:
            ``allocated``, ``reserved``, ``process`` (this process per driver
            or RSS), ``used`` (device-wide, driver or OS), and ``worker`` for
            an isolated model (what its ended worker process held); ``None``
            where the layer cannot be read here.
        memory_before: The device's reading before unloading.
        memory_after: The reading after cleanup.
        cleanup: The cleanup that ran after release.
        waited_seconds: Time spent waiting for leases to be returned.
        seconds: Wall time of the whole unload, waiting included.
        error: The release error, when the adapter's release failed (the model
            is ``UNLOADED`` regardless).
    """

    model: str
    device: str
    state_before: ModelState
    state_after: ModelState
    died: bool
    verified: bool
    holders: tuple[ReferrerChain, ...] = ()
    survivors: tuple[str, ...] = ()
    neutralised_bytes: int = 0
    held_bytes: int = 0
    held: tuple[str, ...] = ()
    expected_bytes: int | None = None
    freed_bytes: Mapping[str, int | None] = field(default_factory=dict)
    memory_before: DeviceMemory | None = None
    memory_after: DeviceMemory | None = None
    cleanup: CleanupReport | None = None
    waited_seconds: float = 0.0
    seconds: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the model died and nothing held it."""
        return self.died and not self.holders and self.error is None

    @property
    def seen_bytes(self) -> int | None:
        """Bytes that came back: ``worker``, else the first of ``USAGE_LAYERS`` known here."""
        known = (self.freed_bytes.get(layer) for layer in ("worker", *USAGE_LAYERS))
        return next((value for value in known if value is not None), None)

    def __str__(self) -> str:
        if self.state_before is ModelState.UNLOADED:
            return f"{self.model} was not loaded: nothing to unload"
        verdict = "freed" if self.ok else ("unverified" if not self.verified else "HELD")
        layers = ("worker",) + (
            shown_layers(self.memory_before) if self.memory_before is not None else tuple(LAYERS)
        )
        came_back = ", ".join(
            f"{layer} {format_bytes(self.freed_bytes[layer])}"
            for layer in layers
            if self.freed_bytes.get(layer) is not None
        )
        lines = [
            f"unloaded {self.model} from {self.device} in {self.seconds:.3f} s: {verdict}; "
            f"expected {format_bytes(self.expected_bytes)}, came back {came_back or 'n/a'}"
        ]
        if self.survivors:
            lines.append("  still alive: " + "; ".join(self.survivors))
        lines.extend(f"  held by: {chain}" for chain in self.holders)
        if self.neutralised_bytes:
            lines.append(
                f"  freed anyway: {format_bytes(self.neutralised_bytes)} "
                "(stale references now fail loudly)"
            )
        lines.extend(f"  still held: {why}" for why in self.held)
        if self.error:
            lines.append(f"  release failed: {self.error}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ModelStats:
    """Counters and measured costs of one model, for people and for pools.

    Attributes:
        loads: Completed loads.
        unloads: Completed unloads.
        offloads: Completed offloads.
        wakes: Completed wakes.
        load_seconds: Wall time of the last load (``None`` before the first).
        size_bytes: Bytes the model holds, measured at its last load.
        last_used: ``time.monotonic()`` when the last lease ended (or the model loaded).
        wake_seconds: Wall time of the last wake, per tier.
        offloaded_bytes: Bytes held per tier by the last offload.
        offload_seconds: Wall time of the last offload, per tier.
        offload_residue_bytes: Device bytes the model still held while
            offloaded to each tier, measured after its last offload there
            (absent: none). An isolated model's worker keeps its process and
            its CUDA context through an offload inside it.
    """

    loads: int = 0
    unloads: int = 0
    offloads: int = 0
    wakes: int = 0
    load_seconds: float | None = None
    size_bytes: int | None = None
    last_used: float | None = None
    wake_seconds: Mapping[str, float] = field(default_factory=dict)
    offloaded_bytes: Mapping[str, int] = field(default_factory=dict)
    offload_seconds: Mapping[str, float] = field(default_factory=dict)
    offload_residue_bytes: Mapping[str, int] = field(default_factory=dict)
