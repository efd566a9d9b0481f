"""A pool's budget, as one small class per way of saying it.

``ModelPool(budget=...)`` takes bytes (``"10GiB"``), a fraction of the device
(``0.9``) or ``None`` (what the driver says is free, plus what the pool's own
models hold). :func:`parse_budget` turns each into a :class:`Budget`, and the
pool asks it the same four questions whichever it is: the budget now, the
most one model could ever be given, the room left for a model being
admitted, and how far over the pool is.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

from vramkit._units import parse_bytes
from vramkit.devices import Device
from vramkit.errors import InvalidArgumentError, ModelStateError

__all__ = [
    "DEFAULT_HEADROOM_CAP",
    "DEFAULT_HEADROOM_DIVISOR",
    "Budget",
    "BytesBudget",
    "Charges",
    "DriverBudget",
    "FractionBudget",
    "headroom_bytes",
    "parse_budget",
]

# The default headroom: an eighth of the whole budget, at most 512 MiB (ComfyUI
# keeps about 0.8 GiB on large cards; activations stop growing with the card).
DEFAULT_HEADROOM_DIVISOR = 8
DEFAULT_HEADROOM_CAP = 512 * 1024**2


@dataclass(frozen=True, slots=True)
class Charges:
    """What a pool charges against its budget at one moment, in bytes.

    Attributes:
        resident: What its models hold on the device (loads in progress left out).
        charged: Everything it charges but the model being admitted: resident
            bytes and reservations of loads in progress (all of it when no
            model is being admitted).
        own: What the model being admitted already holds on the device.
        reserved: Every reservation of a load in progress.
    """

    resident: int
    charged: int
    own: int = 0
    reserved: int = 0


class Budget(abc.ABC):
    """How many bytes of its device a pool may charge."""

    @abc.abstractmethod
    def limit(self, device: Device, resident: int) -> int:
        """The budget now, in bytes, given what the pool's models hold on the device.

        Raises:
            ModelStateError: The device cannot tell what this budget needs.
        """

    def whole(self, device: Device, resident: int) -> int:
        """The most a single model could ever be given: more than this, it never fits."""
        return self.limit(device, resident)

    def room(self, device: Device, charges: Charges) -> int:
        """Bytes left for the model being admitted (its own bytes not counted against it)."""
        return self.limit(device, charges.resident) - charges.charged

    def overdrawn(self, device: Device, charges: Charges) -> int:
        """Bytes the pool charges beyond its budget (0 or less when within it)."""
        return charges.charged - self.limit(device, charges.resident)


@dataclass(frozen=True, slots=True)
class BytesBudget(Budget):
    """Exactly so many bytes (``budget="10GiB"``)."""

    value: int

    def limit(self, device: Device, resident: int) -> int:
        """The bytes given."""
        return self.value


@dataclass(frozen=True, slots=True)
class FractionBudget(Budget):
    """A fraction of the device's total (``budget=0.9``)."""

    fraction: float

    def limit(self, device: Device, resident: int) -> int:
        """That fraction of what the device reports as its total."""
        total = device.read().total_bytes
        if total is None:
            raise ModelStateError(f"{device} reports no total: use a budget in bytes")
        return int(total * self.fraction)


@dataclass(frozen=True, slots=True)
class DriverBudget(Budget):
    """What the driver says is free now, plus what the pool's own models hold (``budget=None``).

    On CUDA with NVML, other processes' memory is then counted too. Loads
    already show in the driver's numbers, so the pool is never over budget by
    its own accounting.
    """

    def limit(self, device: Device, resident: int) -> int:
        """The driver's free bytes plus ``resident``."""
        free = device.read().free_bytes
        if free is None:
            raise ModelStateError(
                f"{device} reports no free memory (install the nvml extra?): "
                "give the pool a budget in bytes"
            )
        return int(free) + resident

    def whole(self, device: Device, resident: int) -> int:
        """The device's total, where known."""
        total = device.read().total_bytes
        return int(total) if total is not None else self.limit(device, resident)

    def room(self, device: Device, charges: Charges) -> int:
        """What the driver says is free, plus the model's own bytes, minus reservations."""
        return int(device.read().free_bytes or 0) + charges.own - charges.reserved

    def overdrawn(self, device: Device, charges: Charges) -> int:
        """Never: the driver's own accounting already includes every load."""
        return 0


def parse_budget(budget: int | float | str | None) -> Budget:
    """The :class:`Budget` a ``budget=`` argument means.

    Raises:
        InvalidArgumentError: A fraction outside (0, 1], or a size that is not
            a positive number of bytes.
    """
    if budget is None:
        return DriverBudget()
    if isinstance(budget, float) and not isinstance(budget, bool):
        if not 0 < budget <= 1:
            raise InvalidArgumentError(
                f"budget as a fraction of the device must be in (0, 1]; got {budget!r} "
                "(use bytes or a string like '10GiB' for an absolute budget)"
            )
        return FractionBudget(budget)
    value = parse_bytes(budget, what="budget")
    if value == 0:
        raise InvalidArgumentError("budget must be more than 0 bytes")
    return BytesBudget(value)


def headroom_bytes(fixed: int | None, whole: int) -> int:
    """Bytes kept free beyond a reservation, for a pool whose whole budget is ``whole``.

    ``fixed`` is the headroom the pool was given, if any. A fixed default would
    refuse everything under a budget smaller than itself, so the default scales
    with the budget and is capped where a large device's activations and
    allocator slack stop growing with it.
    """
    if fixed is not None:
        return fixed
    return min(DEFAULT_HEADROOM_CAP, whole // DEFAULT_HEADROOM_DIVISOR)
