"""Property tests of the parsers: whatever a user writes in a marker, an option, an environment variable or an
ini file, the parser returns a value or raises BadValue, in one line that names the value and its source."""

from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pytest_gpumem import cli
from pytest_gpumem.config.marker import parse_marker
from pytest_gpumem.config.settings import OPTIONS, Option, Settings, resolve
from pytest_gpumem.core.units import MAX_SIZE, BadValue, Tolerance, parse_size, parse_tolerance
from pytest_gpumem.report import json_report

FAST = settings(max_examples=300, deadline=None, database=None)  # no example database in the working tree

WHERE = "gpumem marker of t.py::test_x"

# Text near the grammar ("1.5 GiB", "-2 %", "3%, 1 MiB"), so the accepting paths are explored too, and any text.
NUMBER = st.from_regex(r"-?[0-9]{0,4}(\.[0-9]{0,3})?(e[0-9])?", fullmatch=True) | st.sampled_from(
    ["9" * 400, "1" + "0" * 30, "nan", "inf", "\u0663", "\u00b2", ".5", "5."]
)
UNIT = st.sampled_from(["", "B", "KiB", "MiB", "GiB", "TiB", "KB", "GB", "gib", "%", "parsecs", "G"])
SPACE = st.sampled_from(["", " ", "  ", "\t", "\n", "\u00a0"])
TERM = st.builds(lambda s1, n, s2, u: s1 + n + s2 + u, SPACE, NUMBER, SPACE, UNIT)
TEXT = st.text() | TERM | st.lists(TERM, min_size=1, max_size=3).map(",".join)
ANY = TEXT | st.integers() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.booleans() | st.none()
VALUE = ANY | st.lists(ANY, max_size=2) | st.dictionaries(ANY.filter(lambda v: v is None or v == v), ANY, max_size=2)


def one_line(message: str) -> bool:
    return len(message.splitlines()) == 1


def names(message: str, value: Any) -> bool:
    """Whether ``message`` quotes ``value``, or the part of it that is wrong (a key or item of a container,
    one comma-separated part of a text)."""
    if repr(value) in message:
        return True
    if isinstance(value, str):
        return any(repr(part.strip()) in message or repr(part) in message for part in value.split(","))
    if isinstance(value, dict):
        return any(names(message, k) or names(message, v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(names(message, v) for v in value)
    return False


def check_error(error: BadValue, where: str, value: Any) -> None:
    message = str(error)
    assert one_line(message), message
    assert message.startswith(where + ": "), message
    assert names(message, value), message


# -- units


@FAST
@given(ANY)
def test_parse_size_returns_bytes_or_says_what_is_wrong(value: Any) -> None:
    try:
        size = parse_size(value, "--gpumem-device-limit")
    except BadValue as error:
        check_error(error, "--gpumem-device-limit", value)
    else:
        assert isinstance(size, int) and 0 <= size <= MAX_SIZE


@FAST
@given(ANY, st.integers(min_value=0, max_value=MAX_SIZE))
def test_parse_tolerance_returns_a_usable_tolerance_or_says_what_is_wrong(value: Any, baseline: int) -> None:
    try:
        tolerance = parse_tolerance(value, "ini option gpumem_tolerance")
    except BadValue as error:
        check_error(error, "ini option gpumem_tolerance", value)
    else:
        assert tolerance.percent >= 0 and 0 <= tolerance.floor <= MAX_SIZE
        assert tolerance.allowed(baseline) >= tolerance.floor  # never raises, whatever the percentage


# -- the marker

KEYWORDS = st.sampled_from(
    ["budget", "tolerance", "metric", "device_limit", "leak", "retry_on_oom", "budget_per_device", "exclusive"]
)
MARKER_VALUE = VALUE | st.sampled_from(["allocated", "reserved", "device", "batch", "seq", "cuda:1", "1 GiB", "2%"])
DEVICE_BUDGETS = st.dictionaries(
    st.sampled_from(["cuda:0", "cuda:1", "cpu", "rank0:cuda:0", "cuda1", "gpu"]) | st.integers(-2, 3) | st.text(),
    MARKER_VALUE,
    max_size=3,
)


@FAST
@given(
    st.lists(MARKER_VALUE, max_size=4),
    st.dictionaries(KEYWORDS | st.text(min_size=1), MARKER_VALUE | DEVICE_BUDGETS, max_size=4),
)
def test_parse_marker_returns_a_spec_or_one_line_naming_the_test(args: list[Any], kwargs: dict[str, Any]) -> None:
    try:
        spec = parse_marker(
            tuple(args),
            kwargs,
            default_tolerance=Tolerance(percent=2.0),
            metrics=("allocated", "reserved"),
            backend="cpu",
            where=WHERE,
        )
    except BadValue as error:
        message = str(error)
        assert one_line(message) and message.startswith(WHERE + ": "), message
        assert (
            names(message, args) or any(repr(k) in message or k in message for k in kwargs) or names(message, kwargs)
        ), message
    else:
        assert spec.metric in ("allocated", "reserved")
        assert isinstance(spec.exclusive, bool)


# -- options, environment variables and ini keys


class Config:
    """What ``settings.resolve`` reads of a pytest config: the command line, the ini file, the directories."""

    def __init__(self, cli: dict[str, Any], ini: dict[str, str]) -> None:
        self.cli, self.ini = cli, ini
        self.rootpath = Path("/project")
        self.inipath = Path("/project/pytest.ini")
        self.invocation_params = mock.Mock(dir=Path("/project"))

    def getoption(self, name: str) -> Any:
        return self.cli.get(name)

    def getini(self, name: str) -> str:
        return self.ini.get(name, "")


# What a command line, an environment variable and an ini file can hold: no NUL, no lone surrogate.
OPTION_TEXT = (
    TEXT | st.sampled_from(["auto", "cpu", "true", "off", "H100", "24GiB", "bmf=x.json", "~nobody-here"])
).map(lambda text: text.replace("\x00", "").encode("utf-8", "replace").decode("utf-8"))


@settings(FAST, max_examples=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(OPTIONS), OPTION_TEXT)
def test_every_option_from_every_source_resolves_or_names_the_source(option: Option, text: str) -> None:
    sources = [("cli", option.flag)]
    if text.strip():  # an empty variable or ini key is unset
        sources.append(("env", f"environment variable {option.env}"))
        if option.ini:
            sources.append(("ini", f"ini option {option.ini_name}"))
    for kind, where in sources:
        value: Any = text
        if option.kind == "bool" and kind == "cli":
            value = True  # a store_true flag
        config = Config(
            cli={"gpumem_" + option.name: value} if kind == "cli" else {},
            ini={option.ini_name: text} if kind == "ini" else {},
        )
        environ = {k: v for k, v in os.environ.items() if not k.startswith("GPUMEM_")}
        if kind == "env":
            environ[option.env] = text
        with mock.patch.dict(os.environ, environ, clear=True):
            try:
                resolved = resolve(config)
            except BadValue as error:
                check_error(error, where, value)
            else:
                assert isinstance(resolved, Settings) and resolved.source(option.name) == where


# -- the command line: an option's value, whatever it starts with, reaches the option's own check


@pytest.fixture(scope="module")
def empty_results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("results") / "empty.json"
    path.write_text(json.dumps(json_report.build([], {})))
    return path


@settings(FAST, max_examples=100)
@given(text=OPTION_TEXT, joined=st.booleans())
def test_compare_tolerance_from_the_command_line(empty_results: Path, text: str, joined: bool) -> None:
    empty = empty_results
    argv = ["compare", str(empty), str(empty)]
    argv += [f"--tolerance={text}"] if joined else ["--tolerance", text]
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        status = cli.main(argv)
    if status == 0:
        parse_tolerance(text, "--tolerance")  # accepted by the command, so by the parser
    else:
        assert status == 2 and one_line(err.getvalue()), err.getvalue()
        assert err.getvalue().startswith("gpumem compare: error: "), err.getvalue()
