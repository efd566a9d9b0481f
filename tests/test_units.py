import datetime
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramkit import InvalidArgumentError, format_bytes, parse_bytes
from vramkit._units import format_part_of, parse_seconds


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0B", 0),
        ("512", 512),
        (" 512 B ", 512),
        ("1KiB", 1024),
        ("1.5 GiB", 3 * 1024**3 // 2),
        ("16MiB", 16 * 1024**2),
        ("16mib", 16 * 1024**2),
        ("2TiB", 2 * 1024**4),
        (".5KiB", 512),
        ("1e3", 1000),
        ("2GB", 2_000_000_000),
        ("1kB", 1000),
        ("3MB", 3_000_000),
        (4096, 4096),
        (0, 0),
        (8.0, 8),
    ],
)
def test_parse_bytes_accepts(text: str | int, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("ten", "got 'ten'"),
        ("-1GiB", "negative"),
        (-5, "negative"),
        ("nan", "got 'nan'"),
        ("inf", "got 'inf'"),
        (math.nan, "got nan"),
        (math.inf, "got inf"),
        ("10G", "ambiguous"),
        ("10 gigs", "unknown unit"),
        ("1.5", "fraction of a byte"),
        (1.5, "got 1.5"),
        (True, "got True"),
        (None, "got None"),
        ([1], "got [1]"),
        ("", "got ''"),
        ("1e400GiB", "too large"),
    ],
)
def test_parse_bytes_rejects_with_the_accepted_forms(value: object, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError) as info:
        parse_bytes(value, what="tolerance")  # type: ignore[arg-type]
    message = str(info.value)
    assert message.startswith("tolerance must be a non-negative number of bytes")
    assert "'16MiB'" in message  # names an accepted form
    assert fragment in message


def test_invalid_argument_error_is_value_and_type_error() -> None:
    with pytest.raises(ValueError):
        parse_bytes("ten")
    with pytest.raises(TypeError):
        parse_bytes(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, "n/a"),
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (1024**3 - 1, "1.0 GiB"),  # never "1024.0 MiB"
        (5 * 1024**3 + 200 * 1024**2, "5.2 GiB"),
        (-12 * 1024**2, "-12.0 MiB"),
        (2**70, "1048576.0 PiB"),  # PiB is the largest unit
    ],
)
def test_format_bytes(value: int | None, expected: str) -> None:
    assert format_bytes(value) == expected


def test_format_bytes_signed_and_precision() -> None:
    assert format_bytes(12 * 1024**2, signed=True) == "+12.0 MiB"
    assert format_bytes(0, signed=True) == "0 B"
    assert format_bytes(1536, precision=3) == "1.500 KiB"


def test_format_part_of_uses_the_unit_of_the_whole() -> None:
    assert format_part_of(5 * 1024**3 + 200 * 1024**2, 16 * 1024**3) == "5.2 / 16.0 GiB"
    assert format_part_of(100, 1000) == "100 / 1000 B"


@given(st.integers(min_value=0, max_value=2**60))
def test_format_then_parse_round_trips_within_rounding(value: int) -> None:
    text = format_bytes(value, precision=3)
    parsed = parse_bytes(text)
    # three decimals of the chosen unit: relative error below 0.05%
    assert abs(parsed - value) <= max(1, value * 5e-4)


@given(
    st.floats(min_value=0, max_value=1e6, allow_nan=False),
    st.sampled_from(["KiB", "MiB", "GiB", "kB", "MB", "GB"]),
)
def test_parse_bytes_scales_by_the_unit(number: float, unit: str) -> None:
    factor = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "kB": 1e3, "MB": 1e6, "GB": 1e9}[unit]
    text = f"{number!r}{unit}"
    assert parse_bytes(text) == round(float(repr(number)) * factor)


@given(st.text(max_size=12))
def test_parse_bytes_never_raises_anything_but_invalid_argument(text: str) -> None:
    try:
        result = parse_bytes(text)
    except InvalidArgumentError:
        return
    assert isinstance(result, int)
    assert result >= 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (30, 30.0),
        (0.5, 0.5),
        ("30", 30.0),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5min", 300.0),
        ("5m", 300.0),
        ("1.5h", 5400.0),
        ("1d", 86400.0),
        (" 2 MIN ", 120.0),
        (datetime.timedelta(minutes=2), 120.0),
    ],
)
def test_parse_seconds_accepts(value: float | str | datetime.timedelta, expected: float) -> None:
    assert parse_seconds(value) == expected


@pytest.mark.parametrize(
    "value",
    ["-1s", "5 years", "soon", "", True, None, float("nan"), float("inf"), "1e999s", -3],
)
def test_parse_seconds_rejects_naming_the_parameter(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"^every must be a non-negative duration"):
        parse_seconds(value, what="every")  # type: ignore[arg-type]
