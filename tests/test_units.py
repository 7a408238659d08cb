"""Sizes and tolerances: what people write, and the one-line errors for what they get wrong."""

from __future__ import annotations

import pytest

from pytest_gpumem.core.units import (
    BadValue,
    Tolerance,
    format_bytes,
    format_delta,
    format_percent,
    parse_size,
    parse_tolerance,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("6 GiB", 6 * 2**30),
        ("512MiB", 512 * 2**20),
        ("1.5 GB", 1_500_000_000),
        ("1.5 gb", 1_500_000_000),
        ("4096", 4096),
        ("10 B", 10),
        ("2 KiB", 2048),
        ("2 KB", 2000),
        ("1 TiB", 2**40),
        (".5 MiB", 2**19),
        (123, 123),
        (0, 0),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text, "here") == expected


@pytest.mark.parametrize("bad", ["6 GB?", "abc", "-1 GiB", "1.2.3 MiB", "", "6 GiBs", -1, 1.5, True, None, [1]])
def test_parse_size_rejects_with_value_and_source(bad):
    with pytest.raises(BadValue) as info:
        parse_size(bad, "marker of test_x")
    message = str(info.value)
    assert message.startswith("marker of test_x: ")
    assert repr(bad) in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2%", Tolerance(percent=2.0)),
        ("0.5 %", Tolerance(percent=0.5)),
        ("256 MiB", Tolerance(floor=256 * 2**20)),
        ("2%, 1 MiB", Tolerance(percent=2.0, floor=2**20)),
        ("1 MiB, 2%", Tolerance(percent=2.0, floor=2**20)),
        (1024, Tolerance(floor=1024)),
        ("0%", Tolerance()),
    ],
)
def test_parse_tolerance(text, expected):
    assert parse_tolerance(text, "here") == expected


@pytest.mark.parametrize("bad", ["-1%", "abc", "2%%", "2%, 3%", "1 MiB, 2 MiB", "%", "2 % x", None, 2.5])
def test_parse_tolerance_rejects_with_value_and_source(bad):
    with pytest.raises(BadValue) as info:
        parse_tolerance(bad, "ini option gpumem_tolerance")
    assert str(info.value).startswith("ini option gpumem_tolerance: ")
    assert repr(bad) in str(info.value)


@pytest.mark.parametrize(
    ("tolerance", "baseline", "allowed"),
    [
        (Tolerance(percent=2.0), 1000, 20),
        (Tolerance(percent=2.0), 999, 19),  # floor: allowed growth never rounds up
        (Tolerance(percent=2.0, floor=100), 1000, 100),
        (Tolerance(percent=2.0, floor=100), 10**6, 20_000),
        (Tolerance(floor=5), 10**9, 5),
        (Tolerance(), 10**9, 0),
    ],
)
def test_allowed_growth_is_the_larger_of_percent_and_floor(tolerance, baseline, allowed):
    assert tolerance.allowed(baseline) == allowed


@pytest.mark.parametrize(
    ("tolerance", "text"),
    [(Tolerance(percent=2.0), "2%"), (Tolerance(floor=2**20), "1.00 MiB"), (Tolerance(2.5, 2**10), "2.5%, 1.00 KiB")],
)
def test_tolerance_str(tolerance, text):
    assert str(tolerance) == text


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.00 KiB"),
        (1536, "1.50 KiB"),
        (2**30 - 1, "1.00 GiB"),
        (6 * 2**30, "6.00 GiB"),
        (3 * 2**40, "3.00 TiB"),
        (-(2**20), "-1.00 MiB"),
        (None, "-"),
    ],
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_format_delta_and_percent():
    assert format_delta(2**20) == "+1.00 MiB"
    assert format_delta(-(2**20)) == "-1.00 MiB"
    assert format_delta(0) == "+0 B"
    assert format_percent(31, 1000) == "+3.1%"
    assert format_percent(5, 0) == "-"
    assert format_percent(None, 10) == "-"
