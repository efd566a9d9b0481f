import datetime
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vramkit import InvalidArgumentError, format_bytes, parse_bytes
from vramkit._units import (
    MAX_BYTES,
    check_flag,
    check_seconds,
    format_part_of,
    parse_seconds,
    parse_timeout,
)


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


@pytest.mark.parametrize(
    ("value", "expected"),
    [(8e9, "7.5 GiB"), (1536.4, "1.5 KiB"), (-2.0, "-2 B"), (0.4, "0 B")],
)
def test_format_bytes_rounds_floats_to_whole_bytes(value: float, expected: str) -> None:
    assert format_bytes(value) == expected


def test_format_bytes_takes_numpy_integers() -> None:
    import numpy as np

    assert format_bytes(np.int64(1024)) == "1.0 KiB"  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("call", "fragment"),
    [
        (lambda: format_bytes(math.nan), "value must be a number of bytes"),
        (lambda: format_bytes(math.inf), "value must be a number of bytes"),
        (lambda: format_bytes("5"), "value must be a number of bytes"),
        (lambda: format_bytes(True), "value must be a number of bytes"),
        (lambda: format_bytes(1, precision=-1), "precision must be"),
        (lambda: format_bytes(1, precision=1.5), "precision must be"),
        (lambda: format_bytes(1, signed=1), "signed must be True or False"),
        (lambda: format_part_of(1, math.nan), "whole must be"),
    ],
)
def test_format_bytes_rejects_what_is_not_a_byte_count(call: Any, fragment: str) -> None:
    with pytest.raises(InvalidArgumentError, match="must be") as info:
        call()
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "text", ["\u0661\u0662MiB", "\uff11\uff12MiB", "1\u00a0MiB", "1e99GiB", "1e19", 2**63]
)
def test_parse_bytes_refuses_other_scripts_digits_and_absurd_sizes(text: object) -> None:
    with pytest.raises(InvalidArgumentError, match="size must be"):
        parse_bytes(text)  # type: ignore[arg-type]


def test_parse_bytes_takes_the_largest_size_a_counter_holds() -> None:
    assert parse_bytes(MAX_BYTES) == 2**63 - 1


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), (0, 0.0), (2.5, 2.5), (math.inf, None), (1e308, None), (1e10, None)],
)
def test_parse_timeout_means_no_limit_past_what_a_lock_can_wait(
    value: float | None, expected: float | None
) -> None:
    assert parse_timeout(value) == expected


@pytest.mark.parametrize("value", [math.nan, -1, "5", True, [1]])
def test_parse_timeout_refuses_nan_negatives_and_non_numbers(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="wait_for must be seconds >= 0"):
        parse_timeout(value, "wait_for")


@pytest.mark.parametrize("value", [math.nan, math.inf, -0.5, "1", False, None])
def test_check_seconds_wants_a_finite_number(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match="pause must be a finite number of seconds"):
        check_seconds(value, "pause")


def test_check_seconds_with_and_without_zero() -> None:
    assert check_seconds(0, "pause") == 0.0
    with pytest.raises(InvalidArgumentError, match="more than 0"):
        check_seconds(0, "pause", allow_zero=False)


@pytest.mark.parametrize("value", ["false", "True", 0, 1, None, 1.0])
def test_check_flag_takes_only_true_and_false(value: object) -> None:
    with pytest.raises(InvalidArgumentError, match=r"strict must be True or False; got"):
        check_flag(value, "strict")
    assert check_flag(True, "strict") is True
    assert check_flag(False, "strict") is False
