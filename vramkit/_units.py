"""Byte counts and durations in, byte counts out: parsers and one formatter for human units.

Inside vramkit every amount of memory is an ``int`` of bytes. Human units
appear only at the edges (reprs, the CLI, pytest messages, user arguments), and
they go through :func:`format_bytes` and :func:`parse_bytes` alone. The other
quantities people pass in are checked here too, once for every parameter that
takes them: seconds (:func:`parse_seconds` for durations spelled by a person,
:func:`check_seconds` for plain numbers, :func:`parse_timeout` for bounds on a
wait) and on/off flags (:func:`check_flag`).

Units are IEC binary (KiB = 1024 B). SI decimal units are accepted on input and
mean exactly what the SI says (``"1GB"`` is 10**9 bytes, not 2**30), because
someone who writes ``GB`` may mean either and vramkit will not guess silently
in the direction that overcommits a GPU.
"""

from __future__ import annotations

import datetime
import math
import numbers
import re
import threading
from typing import Final

from vramkit.errors import InvalidArgumentError

__all__ = [
    "check_flag",
    "check_seconds",
    "format_bytes",
    "format_part_of",
    "parse_bytes",
    "parse_seconds",
    "parse_timeout",
]

_IEC: Final = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")

_MULTIPLIERS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "pib": 1024**5,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "pb": 1000**5,
}

# ASCII only: Python's \d and float() also take the digits of other scripts (Arabic-Indic...).
_PATTERN: Final = re.compile(
    r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.I | re.ASCII
)

_SECONDS: Final[dict[str, float]] = {
    "": 1.0,
    "ms": 1e-3,
    "s": 1.0,
    "sec": 1.0,
    "min": 60.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
}

_ACCEPTED_SECONDS: Final = (
    "a non-negative duration: seconds as a number (30, 0.5), a datetime.timedelta, or a "
    "string with a unit ('500ms', '30s', '5min', '1.5h', '1d')"
)

MAX_BYTES: Final = 2**63 - 1
"""The largest size accepted: what a signed 64-bit counter (torch's, the driver's) holds."""

_ACCEPTED: Final = (
    "a non-negative number of bytes: an int (16777216), or a string with an IEC unit "
    "('16MiB', '1.5 GiB', '512KiB', '0B'), or an SI unit meaning powers of 1000 "
    "('16MB' = 16,000,000 bytes)"
)


def parse_bytes(value: int | float | str, *, what: str = "size") -> int:
    """Turn a size given by a person into a whole number of bytes.

    Args:
        value: An ``int`` of bytes (a ``float`` only if it is a whole number),
            or a string such as ``"16MiB"``, ``"1.5 GiB"``, ``"512"`` (bytes),
            ``"0B"``. IEC units (KiB, MiB, GiB, TiB, PiB) are powers of 1024;
            SI units (kB, MB, GB, TB, PB) are powers of 1000.
            Units are case-insensitive. Fractions round to the nearest byte.
        what: What the value is, used in the error message (``"tolerance"``).

    Returns:
        The size in bytes, never negative.

    Raises:
        InvalidArgumentError: For anything else: negative values, NaN or
            infinity, bare unit letters such as ``"10G"`` (ambiguous), words,
            booleans, floats that are not whole numbers of bytes.

    Examples:
        >>> parse_bytes("1.5 KiB")
        1536
        >>> parse_bytes("2GB")
        2000000000
    """
    if not isinstance(what, str) or not what:
        raise InvalidArgumentError(
            f"what must be a non-empty string naming the value for error messages; got {what!r}"
        )
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise InvalidArgumentError(f"{what} must be {_ACCEPTED}; got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value) or value < 0 or not value.is_integer():
            raise InvalidArgumentError(f"{what} must be {_ACCEPTED}; got {value!r}")
        return _within_range(int(value), value, what)
    if isinstance(value, int):
        if value < 0:
            raise InvalidArgumentError(f"{what} must be {_ACCEPTED}; got {value!r} (negative)")
        return _within_range(value, value, what)
    match = _PATTERN.match(value)
    if match is None:
        raise InvalidArgumentError(f"{what} must be {_ACCEPTED}; got {value!r}")
    number_text, unit = match.groups()
    multiplier = _MULTIPLIERS.get(unit.lower())
    if multiplier is None:
        hint = ""
        if unit.lower() in {"k", "m", "g", "t", "p"}:
            hint = f" ({unit!r} is ambiguous: write '{unit.upper()}iB' or '{unit.upper()}B')"
        raise InvalidArgumentError(
            f"{what} must be {_ACCEPTED}; got {value!r}: unknown unit {unit!r}{hint}"
        )
    number = float(number_text)
    if number < 0:
        raise InvalidArgumentError(f"{what} must be {_ACCEPTED}; got {value!r} (negative)")
    if not math.isfinite(number * multiplier):
        raise InvalidArgumentError(f"{what} must be {_ACCEPTED}; got {value!r} (too large)")
    if multiplier == 1 and not number.is_integer():
        raise InvalidArgumentError(
            f"{what} must be {_ACCEPTED}; got {value!r} (a fraction of a byte)"
        )
    return _within_range(round(number * multiplier), value, what)


def _within_range(size: int, value: object, what: str) -> int:
    if size > MAX_BYTES:
        raise InvalidArgumentError(
            f"{what} must be {_ACCEPTED}; got {value!r} (too large: more than 8 EiB)"
        )
    return size


def format_bytes(value: int | float | None, *, precision: int = 1, signed: bool = False) -> str:
    """Format a byte count for people, in IEC units.

    Args:
        value: Bytes; may be negative (a delta). A float (``0.9 * total``)
            is rounded to whole bytes. ``None`` (a reading that does not exist
            on this machine) prints as ``"n/a"``.
        precision: Digits after the decimal point for units above bytes.
        signed: Prefix positive values with ``+`` (for deltas).

    Returns:
        A string such as ``"5.2 GiB"``, ``"-12.0 MiB"``, ``"+512 B"`` or ``"n/a"``.

    Raises:
        InvalidArgumentError: ``value`` is not a number (or is NaN or
            infinite), ``precision`` is not a whole number from 0 to 20, or
            ``signed`` is not a bool.

    Examples:
        >>> format_bytes(5 * 1024**3 + 200 * 1024**2)
        '5.2 GiB'
        >>> format_bytes(-12 * 1024**2, signed=True)
        '-12.0 MiB'
        >>> format_bytes(8e9)
        '7.5 GiB'
    """
    check_flag(signed, "signed")
    _check_precision(precision)
    if value is None:
        return "n/a"
    value = _whole_bytes(value, "value")
    sign = "-" if value < 0 else ("+" if signed and value > 0 else "")
    exponent = _exponent(abs(value), precision)
    return f"{sign}{_scaled(abs(value), exponent, precision)} {_IEC[exponent]}"


def format_part_of(part: int | float, whole: int | float, *, precision: int = 1) -> str:
    """Format ``part`` of ``whole`` in the unit that suits ``whole``: ``"5.2 / 16.0 GiB"``.

    Args:
        part: Bytes used (or any part).
        whole: Bytes in total; picks the unit.
        precision: Digits after the decimal point for units above bytes.

    Returns:
        Both numbers in one IEC unit, the unit written once.
    """
    _check_precision(precision)
    part, whole = _whole_bytes(part, "part"), _whole_bytes(whole, "whole")
    exponent = _exponent(abs(whole), precision)
    return (
        f"{_scaled(part, exponent, precision)} / "
        f"{_scaled(whole, exponent, precision)} {_IEC[exponent]}"
    )


def _exponent(magnitude: int, precision: int) -> int:
    """Index into ``_IEC`` of the unit that shows ``magnitude`` best."""
    exponent = min(max(magnitude.bit_length() - 1, 0) // 10, len(_IEC) - 1)
    # 1023.96 MiB would round to "1024.0 MiB"; say "1.0 GiB" instead.
    if (
        exponent
        and exponent < len(_IEC) - 1
        and round(magnitude / 1024**exponent, precision) >= 1024
    ):
        exponent += 1
    return exponent


def _scaled(value: int, exponent: int, precision: int) -> str:
    return str(value) if exponent == 0 else f"{value / 1024**exponent:.{precision}f}"


def parse_seconds(value: float | str | datetime.timedelta, *, what: str = "duration") -> float:
    """Turn a duration given by a person into seconds.

    Args:
        value: Seconds as an ``int`` or ``float``, a ``datetime.timedelta``, or a
            string such as ``"500ms"``, ``"30s"``, ``"5min"`` (also ``"5m"``),
            ``"1.5h"``, ``"1d"``; a bare number in a string is seconds.
        what: What the value is, used in the error message (``"every"``).

    Returns:
        The duration in seconds, never negative.

    Raises:
        InvalidArgumentError: Negative, NaN or infinite values, booleans,
            unknown units, anything else.

    Examples:
        >>> parse_seconds("5min")
        300.0
        >>> parse_seconds(datetime.timedelta(milliseconds=250))
        0.25
    """
    if isinstance(value, datetime.timedelta):
        seconds = value.total_seconds()
    elif isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidArgumentError(f"{what} must be {_ACCEPTED_SECONDS}; got {value!r}")
    elif isinstance(value, str):
        match = _PATTERN.match(value)
        scale = _SECONDS.get(match.group(2).lower()) if match is not None else None
        if match is None or scale is None:
            raise InvalidArgumentError(f"{what} must be {_ACCEPTED_SECONDS}; got {value!r}")
        seconds = float(match.group(1)) * scale
    else:
        seconds = float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidArgumentError(f"{what} must be {_ACCEPTED_SECONDS}; got {value!r}")
    return seconds


def _whole_bytes(value: object, what: str) -> int:
    """A byte count to format: an int, or a finite float rounded to whole bytes."""
    if not isinstance(value, bool):
        if isinstance(value, numbers.Integral):
            return int(value)  # numpy integers too
        if isinstance(value, float) and math.isfinite(value):
            return round(value)
    raise InvalidArgumentError(
        f"{what} must be a number of bytes (an int, or a finite float) or None; got {value!r}"
    )


def _check_precision(precision: object) -> None:
    if isinstance(precision, bool) or not isinstance(precision, int) or not 0 <= precision <= 20:
        raise InvalidArgumentError(
            f"precision must be a whole number of decimal places from 0 to 20; got {precision!r}"
        )


# ---------------------------------------------------------------------- seconds and flags

_NO_LIMIT: Final = threading.TIMEOUT_MAX
"""Longer than any lock can wait (about 292 years): a bound this long is no bound."""


def check_seconds(value: object, what: str, *, allow_zero: bool = True) -> float:
    """Check a finite, non-negative number of seconds given as a number.

    Unlike :func:`parse_seconds`, no strings or timedeltas: for parameters
    typed and stored as plain seconds.

    Args:
        value: An int or float.
        what: The parameter's name, for the error message.
        allow_zero: Whether ``0`` is allowed.

    Returns:
        The seconds, as a float.

    Raises:
        InvalidArgumentError: A bool, a non-number, NaN, infinity, a negative
            number (or zero when not allowed).
    """
    bound = "0 or more" if allow_zero else "more than 0"
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value < 0
        or (value == 0 and not allow_zero)
    ):
        raise InvalidArgumentError(
            f"{what} must be a finite number of seconds, {bound}; got {value!r}"
        )
    return float(value)


def parse_timeout(value: object, what: str = "timeout") -> float | None:
    """Check a bound on a wait: seconds >= 0, where ``None`` and infinity mean no limit.

    A bound longer than any lock can wait (``threading.TIMEOUT_MAX``, about
    292 years) is no bound either: ``1e308`` waits like ``None`` instead of
    overflowing inside the lock.

    Args:
        value: ``None``, an int or a float.
        what: The parameter's name, for the error message.

    Returns:
        The seconds, or ``None`` for no limit.

    Raises:
        InvalidArgumentError: A bool, a non-number, NaN or a negative number.
    """
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or math.isnan(value)
        or value < 0
    ):
        raise InvalidArgumentError(
            f"{what} must be seconds >= 0, or None (or infinity) for no limit; got {value!r}"
        )
    return None if value >= _NO_LIMIT else float(value)


def check_flag(value: object, what: str) -> bool:
    """Check an on/off parameter: only ``True`` and ``False`` pass.

    ``bool(value)`` would take ``"false"`` for True and ``None`` for False;
    a flag given as anything but a bool is a mistake worth naming.

    Args:
        value: The flag.
        what: The parameter's name, for the error message.

    Returns:
        ``value``.

    Raises:
        InvalidArgumentError: ``value`` is not a bool.
    """
    if not isinstance(value, bool):
        raise InvalidArgumentError(
            f"{what} must be True or False; got {value!r} ({type(value).__name__})"
        )
    return value
