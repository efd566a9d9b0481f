"""What a managed model shows: its state, sizes, costs and status line, read-only.

Everything here reads; nothing changes the model. ``vramkit ps``, status pages,
pools and reports read a model through these.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from typing import TYPE_CHECKING, Any, TypeVar

from vramkit._units import format_bytes
from vramkit.adapters import Adapter
from vramkit.adapters._checkpoint import checkpoint_bytes
from vramkit.devices import Device
from vramkit.isolation import WorkerProxy, worker_pid
from vramkit.isolation._loader import IsolatedLoader
from vramkit.model import tiers
from vramkit.model._borrow import Borrowing
from vramkit.model.reports import ModelState, ModelStats

if TYPE_CHECKING:
    from vramkit.model.tiers import TierCost

__all__ = ["ModelView"]

T = TypeVar("T")


class ModelView(Borrowing[T]):
    """The read-only face of one model: what it is, where, how big, and its status line."""

    _inference_mode: bool

    @property
    def name(self) -> str:
        """The model's name."""
        return self._name

    @property
    def device(self) -> Device:
        """The device the model lives on."""
        return self._device

    @property
    def state(self) -> ModelState:
        """The current :class:`ModelState`."""
        return self._life.state

    @property
    def tier(self) -> str | None:
        """The offload tier (``"cpu"``, ``"disk"``) while ``OFFLOADED``, else ``None``."""
        return self._parked.tier

    @property
    def leases(self) -> int:
        """How many leases are out right now."""
        return self._life.count()

    @property
    def is_loaded(self) -> bool:
        """Whether the object is resident and ready (``READY``)."""
        return self._life.state is ModelState.READY

    @property
    def inference_mode(self) -> bool:
        """Whether synchronous leases run under ``torch.inference_mode()``."""
        return self._inference_mode

    @property
    def keep_alive(self) -> float | None:
        """Idle seconds before expiry (``None``: never)."""
        return self._keep_alive

    @property
    def config(self) -> Mapping[str, Any]:
        """The configuration the loader closes over (read-only)."""
        return self._config

    @property
    def adapter(self) -> Adapter | None:
        """The adapter in use (known once the model has loaded, or when given)."""
        return self._adapter_override or self._adapter

    @property
    def stats(self) -> ModelStats:
        """Counters and measured costs (load seconds, size, wake seconds per tier...)."""
        return replace(self._stats, last_used=self._life.last_used)

    @property
    def size_bytes(self) -> int | None:
        """Bytes the model held at its last load (``None`` before the first)."""
        return self._stats.size_bytes

    @property
    def idle_seconds(self) -> float | None:
        """Seconds since the last lease ended, while loaded and idle; else ``None``."""
        life = self._life
        last = life.last_used
        if life.count() or last is None or life.state is ModelState.UNLOADED:
            return None
        return time.monotonic() - last

    @property
    def pool(self) -> Any:
        """The :class:`~vramkit.ModelPool` this model belongs to, or ``None``.

        Typed loosely: pools sit a layer above models, which never import them.
        """
        return self._owner

    @property
    def device_bytes(self) -> int:
        """Bytes the model holds on its device now: what leaving the device would free.

        Mid-transition, what is really there: nothing once the weights left the
        device. An isolated model offloaded inside its worker counts what the
        worker still holds (its interpreter, imports and CUDA context).
        """
        size = self._stats.size_bytes or 0
        residue = self._stats.offload_residue_bytes.get(self._parked.tier or "", 0)
        return self._parked.device_bytes(
            self._life.state, size, on_host=self._device.is_host, residue=residue
        )

    def to_dict(self) -> dict[str, Any]:
        """The model's line as JSON-ready data (what status pages and ``vramkit ps`` show).

        Returns:
            ``name``, ``device``, ``state``, ``tier``, ``device_bytes``,
            ``size_bytes`` (the expected size), ``leases``, ``idle_seconds``,
            ``keep_alive`` (seconds or ``None``), ``pool`` (its pool's name or
            ``None``), ``loads``, ``wakes``, ``offloads``, ``unloads``,
            ``isolated`` and ``worker_pid`` (the process an isolated model
            runs in while loaded, else ``None``).
        """
        stats = self._stats
        pool = self.pool
        obj = self._life.obj
        return {
            "name": self._name,
            "device": str(self._device),
            "state": self._life.state.value,
            "tier": self._parked.tier,
            "device_bytes": self.device_bytes,
            "size_bytes": self.expected_bytes,
            "leases": self._life.count(),
            "idle_seconds": self.idle_seconds,
            "keep_alive": self._keep_alive,
            "pool": None if pool is None else pool.name,
            "loads": stats.loads,
            "wakes": stats.wakes,
            "offloads": stats.offloads,
            "unloads": stats.unloads,
            "isolated": isinstance(self._loader, IsolatedLoader),
            "worker_pid": worker_pid(obj) if isinstance(obj, WorkerProxy) else None,
        }

    def __repr__(self) -> str:
        size = format_bytes(self._stats.size_bytes) if self._stats.size_bytes is not None else "?"
        tier = self._parked.tier
        return (
            f"<ManagedModel {self._name!r} {self._life.state}{f' ({tier})' if tier else ''} on "
            f"{self._device}, {size}, {self._life.count()} leases>"
        )

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._life.closed

    @property
    def expected_bytes(self) -> int | None:
        """Bytes the model will need when loaded: measured at its last load, else estimated.

        The estimate is the size of its checkpoint files (``model.pt``,
        ``*.safetensors``, ``*.onnx``... under the paths in ``config``) or the
        ``size_hint`` it was given; ``None`` when nothing is known.
        """
        if self._stats.size_bytes is not None:
            return self._stats.size_bytes
        if self._size_hint is not None:
            return self._size_hint
        return checkpoint_bytes(self._config)

    def tier_costs(self) -> dict[str, TierCost]:
        """What each way of freeing the device would cost, from this model's measurements.

        Returns:
            ``{"cpu": ..., "disk": ..., "unload": ...}`` :class:`~vramkit.model.tiers.TierCost`
            entries; wake times are measured where this model has woken from
            that tier before, else estimated from its size.
        """
        return self._parked.costs(self._stats, on_host=self._device.is_host)

    def choose_tier(self, *, host_free_bytes: int | None = None) -> str:
        """The cheapest way to free this model's device memory: cpu, disk, or unload.

        The ``cpu`` tier wins when host RAM can hold the weights (pinned copies
        wake fastest); then ``disk`` when waking from it beats a reload; else
        ``unload``. On a ``cpu`` device only ``disk`` or ``unload`` free anything.

        Wake times decide, not offload plus wake: the file is written once and
        reused by every later eviction while the weights are unchanged, and a
        model that is evicted is usually wanted again. (Counting the first
        write made the choice flip with the page cache: a loader that happened
        to read warm files beat write-plus-wake once, and every later
        eviction then paid a full reload.) :meth:`tier_costs` still reports
        the write as ``offload_seconds``.

        Args:
            host_free_bytes: Host RAM available for the cpu tier (default: read now).
        """
        if host_free_bytes is None:
            host_free_bytes = Device("cpu").read().free_bytes or 0
        return tiers.choose_tier(self.tier_costs(), self._stats.size_bytes or 0, host_free_bytes)
