"""The markers: ``no_vram_leak`` and ``vram_limit``, how to read them and how to misuse them."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

import pytest

if TYPE_CHECKING:
    from vramkit.devices import DeviceLike

__all__ = [
    "MARKERS",
    "LeakSpec",
    "LimitSpec",
    "no_vram_leak_args",
    "read_markers",
    "vram_limit_args",
]


@dataclass(frozen=True, slots=True)
class LeakSpec:
    """``no_vram_leak``'s arguments, sizes in bytes."""

    tolerance_bytes: int | None  # None: the configured vram_tolerance
    process_tolerance_bytes: int | None
    device: DeviceLike | None


@dataclass(frozen=True, slots=True)
class LimitSpec:
    """``vram_limit``'s arguments, sizes in bytes."""

    limit_bytes: int
    device: DeviceLike | None


def no_vram_leak_args(
    tolerance: int | float | str | None = None,
    *,
    device: DeviceLike | None = None,
    process_tolerance: int | float | str | None = None,
) -> LeakSpec:
    """Read ``@pytest.mark.no_vram_leak(...)``'s arguments.

    Raises:
        InvalidArgumentError: A size or device that is not one.
    """
    from vramkit._units import parse_bytes

    return LeakSpec(
        None if tolerance is None else parse_bytes(tolerance, what="tolerance"),
        None
        if process_tolerance is None
        else parse_bytes(process_tolerance, what="process_tolerance"),
        _checked_device(device),
    )


def vram_limit_args(limit: int | float | str, *, device: DeviceLike | None = None) -> LimitSpec:
    """Read ``@pytest.mark.vram_limit(...)``'s arguments.

    Raises:
        InvalidArgumentError: A size or device that is not one.
    """
    from vramkit._units import parse_bytes

    return LimitSpec(parse_bytes(limit, what="limit"), _checked_device(device))


def _checked_device(device: DeviceLike | None) -> DeviceLike | None:
    """Reject a malformed or unknown device; a real one this machine lacks is checked at setup."""
    if device is None:
        return None
    from vramkit.devices import resolve_device
    from vramkit.errors import DeviceUnavailableError

    # A GPU test collected on a laptop is skipped at setup, not an error.
    with contextlib.suppress(DeviceUnavailableError):
        resolve_device(device)
    return device


@dataclass(frozen=True, slots=True)
class _MarkerRule:
    name: str
    read: Callable[..., LeakSpec | LimitSpec]
    accepted: str
    line: str


MARKERS: Final[Mapping[str, _MarkerRule]] = {
    "no_vram_leak": _MarkerRule(
        "no_vram_leak",
        no_vram_leak_args,
        '@pytest.mark.no_vram_leak, @pytest.mark.no_vram_leak("1MiB"), '
        '@pytest.mark.no_vram_leak(tolerance="0B", device="cuda:0", process_tolerance="64MiB")',
        "no_vram_leak(tolerance=None, *, device=None, process_tolerance=None): fail the test "
        "when memory it allocated on the device is still held after it and its function-scoped "
        "fixtures ended (vramkit; tolerance defaults to vram_tolerance)",
    ),
    "vram_limit": _MarkerRule(
        "vram_limit",
        vram_limit_args,
        '@pytest.mark.vram_limit("2GiB"), @pytest.mark.vram_limit("512MiB", device="cuda:0")',
        "vram_limit(limit, *, device=None): fail the test when its peak memory on the device "
        "rose more than limit above the start (vramkit; allocator peak on accelerators, "
        "peak RSS on the host)",
    ),
}
"""The markers, by name: how to read each one's arguments, and how to write it."""


def _read_marker(item: pytest.Item, name: str) -> LeakSpec | LimitSpec | None:
    """The closest ``name`` marker's arguments, or ``None`` without one.

    Raises:
        ValueError: A misused marker; the message names the test and the accepted forms.
    """
    from vramkit.errors import InvalidArgumentError

    marker = item.get_closest_marker(name)
    if marker is None:
        return None
    rule = MARKERS[name]
    arguments = [repr(a) for a in marker.args] + [f"{k}={v!r}" for k, v in marker.kwargs.items()]
    written = f"@pytest.mark.{name}({', '.join(arguments)})"
    try:
        inspect.signature(rule.read).bind(*marker.args, **marker.kwargs)
        return rule.read(*marker.args, **marker.kwargs)
    except InvalidArgumentError as exc:
        problem = str(exc)
    except TypeError as exc:
        problem = f"wrong arguments ({exc})"
    raise ValueError(
        f"vramkit: {item.nodeid}: {written}: {problem}\n  accepted forms: {rule.accepted}"
    )


def read_markers(item: pytest.Item) -> tuple[LeakSpec | None, LimitSpec | None]:
    """Both markers' arguments (``None`` where absent).

    Raises:
        ValueError: A misused marker, or the two naming different devices.
    """
    leak = _read_marker(item, "no_vram_leak")
    limit = _read_marker(item, "vram_limit")
    assert leak is None or isinstance(leak, LeakSpec)
    assert limit is None or isinstance(limit, LimitSpec)
    devices = {str(spec.device) for spec in (leak, limit) if spec is not None and spec.device}
    if len(devices) > 1:
        raise ValueError(
            f"vramkit: {item.nodeid}: no_vram_leak and vram_limit name different devices "
            f"({', '.join(sorted(devices))}); a test is checked on one device"
        )
    return leak, limit
