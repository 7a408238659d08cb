"""The reporters (terminal, JSON, Markdown) fed given numbers: exact text, ordering, round trips."""

from __future__ import annotations

import json

import pytest

from pytest_gpumem.core.sample import STATUSES, Baseline, Sample, TestResult, Verdict
from pytest_gpumem.report import json_report, markdown, terminal
from pytest_gpumem.report.table import cells, counts_line, delta_cell, notes

MiB = 2**20
GiB = 2**30
ENV = {
    "backend": "cpu",
    "hardware": "cpu",
    "devices": ["cpu"],
    "software": {"torch": "2.5.1", "transformers": "5.0.0", "peft": "0.13.2", "python": "3.11.7"},
}


def result(
    nodeid: str,
    status: str,
    value: int | None,
    baseline: int | None = None,
    *,
    budget: int | None = None,
    allowed: int | None = None,
    software_changes: tuple[str, ...] = (),
    other_hardware: tuple[str, ...] = (),
    phases: dict[str, int] | None = None,
    hardware: str = "cpu",
) -> TestResult:
    """A TestResult with the given numbers on the ``allocated`` metric of device ``cpu``."""
    if phases is None:
        phases = {"call": value} if value is not None else {}
    sample = Sample(backend="cpu", phases={name: {"allocated": {"cpu": v}} for name, v in phases.items()})
    stored = None
    if baseline is not None:
        stored = Baseline(
            metrics={"allocated": {"cpu": baseline}},
            phases={},
            software={"transformers": "4.57.6", "torch": "2.5.1"},
            recorded="2025-11-20",
            backend="cpu",
        )
    verdict = Verdict(
        status=status,
        metric="allocated",
        value=value,
        budget=budget,
        baseline=baseline,
        allowed=allowed,
        tolerance="2%" if allowed is not None else "",
        software_changes=list(software_changes),
        other_hardware=list(other_hardware),
    )
    return TestResult(nodeid=nodeid, hardware=hardware, sample=sample, verdict=verdict, passed=True, baseline=stored)


def mixed() -> list[TestResult]:
    """One test of every status, deliberately out of order."""
    return [
        result("t.py::ok", "ok", GiB, GiB, allowed=20 * MiB),
        result("t.py::new", "new", 5 * MiB, other_hardware=("H100-80GB",)),
        result("t.py::improved", "improved", GiB, 2 * GiB, allowed=40 * MiB),
        result("t.py::regression", "regression", GiB + 64 * MiB, GiB, allowed=20 * MiB),
        result("t.py::over", "over_budget", 7 * GiB, budget=6 * GiB),
        result("t.py::oom", "oom", None, budget=6 * GiB),
    ]


# ---------------------------------------------------------------- ordering


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        (
            [
                ("a", "ok", 0),
                ("b", "new", None),
                ("c", "improved", -5),
                ("d", "regression", 5),
                ("e", "over_budget", None),
                ("f", "oom", None),
            ],
            ["f", "e", "d", "c", "b", "a"],
        ),
        # within a status, the larger change (either sign) first, then nodeid
        ([("a", "regression", 1), ("b", "regression", 9), ("c", "regression", 5)], ["b", "c", "a"]),
        ([("a", "improved", -1), ("b", "improved", -9)], ["b", "a"]),
        ([("a", "ok", 3), ("b", "ok", -7), ("c", "ok", 7)], ["b", "c", "a"]),
        ([("z", "new", None), ("m", "new", None), ("a", "new", None)], ["a", "m", "z"]),
    ],
)
def test_order(entries: list[tuple[str, str, int | None]], expected: list[str]) -> None:
    base = 100 * MiB
    results = [result(n, s, None if d is None else base + d, None if d is None else base) for n, s, d in entries]
    assert [r.nodeid for r in sorted(results, key=terminal.ORDER)] == expected


# ---------------------------------------------------------------- cells


@pytest.mark.parametrize(
    ("value", "baseline", "expected"),
    [
        (GiB + 12 * MiB, GiB, "+12.00 MiB (+1.2%)"),
        (GiB - 512 * MiB, GiB, "-512.00 MiB (-50.0%)"),
        (GiB, GiB, "+0 B (+0.0%)"),
        (300, 0, "+300 B"),  # no percentage of nothing
        (GiB, None, "-"),
    ],
)
def test_delta_cell(value: int, baseline: int | None, expected: str) -> None:
    assert delta_cell(result("t", "ok", value, baseline).verdict) == expected


def test_cells_in_column_order() -> None:
    r = result("t.py::x", "regression", 3 * GiB // 2, 3 * GiB // 2 - 12 * MiB, budget=6 * GiB, allowed=MiB)
    assert cells(r) == [
        "t.py::x",
        "allocated",
        "1.50 GiB",
        "1.49 GiB",
        "+12.00 MiB (+0.8%)",
        "6.00 GiB",
        "regression",
        "-",  # largest consumer: no attribution
    ]


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (
            ["ok"] * 10 + ["new"] * 3 + ["improved", "over_budget"] + ["regression"] * 2,
            "2 regressions, 1 over budget, 1 improved, 3 new, 10 ok",
        ),
        (["regression", "oom", "oom"], "1 regression, 2 out of memory"),
        (["ok"], "1 ok"),
    ],
)
def test_counts_line(statuses: list[str], expected: str) -> None:
    assert counts_line([result(f"t{i}", s, MiB) for i, s in enumerate(statuses)]) == expected


# ---------------------------------------------------------------- failure message


def test_failure_message_regression() -> None:
    r = result(
        "t.py::train",
        "regression",
        3 * GiB // 2,
        3 * GiB // 2 - 12 * MiB,
        budget=6 * GiB,
        allowed=32212254,
        software_changes=("transformers 4.57.6 -> 5.0.0", "torch 2.5.1 -> 2.6.0"),
        phases={"setup": 1181116006, "call": 3 * GiB // 2, "forward": 1503238554},
    )
    assert terminal.failure_message(r) == (
        "gpumem: regression over baseline (allocated peak, cpu backend, hardware cpu)\n"
        "  peak      1.50 GiB (1610612736 B)\n"
        "  baseline  1.49 GiB (1598029824 B) recorded 2025-11-20 with torch 2.5.1, transformers 4.57.6\n"
        "  delta     +12.00 MiB (+0.8%), tolerance 2% allows +30.72 MiB\n"
        "  budget    6.00 GiB\n"
        "  phases    setup 1.10 GiB, call 1.50 GiB, forward 1.40 GiB\n"
        "  software  changed since the baseline: transformers 4.57.6 -> 5.0.0; torch 2.5.1 -> 2.6.0"
    )


def test_failure_message_over_budget_without_baseline() -> None:
    r = result("t.py::big", "over_budget", 6 * GiB + 512 * MiB, budget=6 * GiB, other_hardware=("A100-80GB", "H100"))
    assert terminal.failure_message(r) == (
        "gpumem: over budget (allocated peak, cpu backend, hardware cpu)\n"
        "  peak      6.50 GiB (6979321856 B)\n"
        "  baseline  none for this hardware; baselines exist for: A100-80GB, H100\n"
        "  budget    6.00 GiB, exceeded by 512.00 MiB\n"
        "  phases    call 6.50 GiB"
    )


def test_failure_message_improved_has_hint_and_shrink_tolerance() -> None:
    r = result("t.py::small", "improved", GiB, 2 * GiB, allowed=40 * MiB)
    lines = terminal.failure_message(r).splitlines()
    assert lines[0] == "gpumem: improved (allocated peak, cpu backend, hardware cpu)"
    assert lines[3] == "  delta     -1.00 GiB (-50.0%), tolerance 2% allows -40.00 MiB"
    assert lines[-1] == "  hint      shrank beyond tolerance: re-record with --gpumem-update-baselines"
    assert not any(line.startswith(("  budget", "  software")) for line in lines)


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ("oom", "out of memory"),
        ("over_budget", "over budget"),
        ("regression", "regression over baseline"),
        ("new", "new"),
        ("ok", "ok"),
    ],
)
def test_failure_message_status_words(status: str, words: str) -> None:
    first = terminal.failure_message(result("t", status, MiB, hardware="NVIDIA-H100-80GB")).splitlines()[0]
    assert first == f"gpumem: {words} (allocated peak, cpu backend, hardware NVIDIA-H100-80GB)"


def test_failure_message_oom_without_peak() -> None:
    r = result("t.py::oom", "oom", None, budget=6 * GiB)
    assert terminal.failure_message(r).splitlines()[1:] == [
        "  peak      -",
        "  baseline  none for this hardware",
        "  budget    6.00 GiB",
    ]


# ---------------------------------------------------------------- terminal summary


def test_summary_lines_exact() -> None:
    assert terminal.summary_lines(mixed()) == [
        "test              metric         peak  baseline               delta    budget  verdict      largest consumer",
        "----------------  ---------  --------  --------  ------------------  --------  -----------  ----------------",
        "t.py::oom         allocated         -         -                   -  6.00 GiB  oom          -",
        "t.py::over        allocated  7.00 GiB         -                   -  6.00 GiB  over budget  -",
        "t.py::regression  allocated  1.06 GiB  1.00 GiB  +64.00 MiB (+6.2%)         -  regression   -",
        "t.py::improved    allocated  1.00 GiB  2.00 GiB  -1.00 GiB (-50.0%)         -  improved     -",
        "t.py::new         allocated  5.00 MiB         -                   -         -  new          -",
        "t.py::ok          allocated  1.00 GiB  1.00 GiB        +0 B (+0.0%)         -  ok           -",
        "1 new test without baselines for hardware cpu; baselines exist for: H100-80GB",
        "improved or new results: review them and record baselines with --gpumem-update-baselines",
        "sizes in binary units (1 GiB = 2^30 bytes)",
        "1 regression, 1 over budget, 1 out of memory, 1 improved, 1 new, 1 ok",
    ]


def test_summary_lines_empty() -> None:
    assert terminal.summary_lines([]) == ["no tests measured"]


def test_summary_lines_long_nodeid_not_truncated() -> None:
    nodeid = "tests/models/test_llama.py::test_qlora_step[" + "x" * 150 + "]"
    lines = terminal.summary_lines([result(nodeid, "ok", MiB, MiB), result("t::short", "ok", MiB, MiB)])
    assert lines[2].startswith("t::short" + " " * (len(nodeid) - len("t::short")) + "  allocated")
    assert lines[3].startswith(nodeid + "  allocated")
    assert lines[0].index("metric") == len(nodeid) + 2


def test_summary_software_changes_grouped() -> None:
    upgrade = ("transformers 4.57.6 -> 5.0.0",)
    both = ("transformers 4.57.6 -> 5.0.0", "torch 2.5.1 -> 2.6.0")
    results = [
        result("a", "ok", MiB, MiB, software_changes=upgrade),
        result("b", "regression", 2 * MiB, MiB, software_changes=upgrade),
        result("c", "ok", MiB, MiB, software_changes=both),
        result("d", "ok", MiB, MiB, software_changes=upgrade),
        result("e", "ok", MiB, MiB),
    ]
    changed = [line for line in terminal.summary_lines(results) if line.startswith("software changed")]
    assert changed == [
        "software changed since baselines: transformers 4.57.6 -> 5.0.0 (3 tests)",
        "software changed since baselines: transformers 4.57.6 -> 5.0.0; torch 2.5.1 -> 2.6.0 (1 test)",
    ]


def test_summary_other_hardware_line() -> None:
    results = [
        result("a", "new", MiB, other_hardware=("H100-80GB",)),
        result("b", "new", MiB, other_hardware=("A100-40GB", "H100-80GB")),
        result("c", "new", MiB),  # no baseline anywhere: not part of that line
        result("d", "over_budget", MiB, budget=1, other_hardware=("B200",)),  # not new: its own message says so
    ]
    assert (
        notes(results)[0] == "2 new tests without baselines for hardware cpu; baselines exist for: A100-40GB, H100-80GB"
    )


@pytest.mark.parametrize(
    ("statuses", "hint"),
    [(["ok", "improved"], True), (["new"], True), (["ok", "regression"], False), (["ok"], False)],
)
def test_summary_update_hint(statuses: list[str], hint: bool) -> None:
    lines = terminal.summary_lines([result(f"t{i}", s, MiB, MiB) for i, s in enumerate(statuses)])
    hinted = [line for line in lines if "--gpumem-update-baselines" in line]
    assert hinted == (
        ["improved or new results: review them and record baselines with --gpumem-update-baselines"] if hint else []
    )


@pytest.mark.parametrize(
    ("warn_only", "verdicts"),
    [
        (True, ["oom (warn)", "over budget (warn)", "regression (warn)", "improved", "new", "ok"]),
        (False, ["oom", "over budget", "regression", "improved", "new", "ok"]),
    ],
)
def test_summary_warn_only(warn_only: bool, verdicts: list[str]) -> None:
    lines = terminal.summary_lines(mixed(), warn_only=warn_only)
    start, end = lines[0].index("verdict"), lines[0].index("largest consumer")
    assert [line[start:end].rstrip() for line in lines[2:8]] == verdicts
    assert [line[end:] for line in lines[2:8]] == ["-"] * 6
    enforced = "warn-only: 3 memory failures reported but not enforced"
    assert (enforced in lines) is warn_only


def test_summary_warn_only_without_failures_adds_no_line() -> None:
    lines = terminal.summary_lines([result("a", "ok", MiB, MiB)], warn_only=True)
    assert not any("warn" in line for line in lines)


# ---------------------------------------------------------------- JSON


def test_json_build() -> None:
    doc = json_report.build(mixed(), ENV)
    assert doc["schema"] == "pytest-gpumem/results/v1"
    assert doc["environment"] == ENV
    assert doc["summary"] == {status: 1 for status in STATUSES}
    assert [t["nodeid"] for t in doc["tests"]] == sorted(r.nodeid for r in mixed())
    assert [t["status"] for t in doc["tests"]] == [t["verdict"]["status"] for t in doc["tests"]]
    first = doc["tests"][0]
    assert {k: v for k, v in first.items() if k != "status"} == result(
        "t.py::improved", "improved", GiB, 2 * GiB, allowed=40 * MiB
    ).to_dict()


def test_json_tests_sorted_by_nodeid() -> None:
    results = [result("t::c", "new", 1), result("t::a", "regression", 2, 1), result("t::b", "oom", None)]
    assert [t["nodeid"] for t in json_report.build(results, ENV)["tests"]] == ["t::a", "t::b", "t::c"]


def test_json_summary_counts_every_status() -> None:
    doc = json_report.build([result("a", "ok", 1), result("b", "ok", 1), result("c", "new", 1)], ENV)
    assert doc["summary"] == {"ok": 2, "new": 1, "improved": 0, "regression": 0, "over_budget": 0, "oom": 0}


def test_json_dumps_deterministic() -> None:
    text = json_report.dumps(json_report.build(mixed(), ENV))
    assert text.endswith("}\n")
    assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"
    assert text == json_report.dumps(json_report.build(list(reversed(mixed())), ENV))


def test_json_round_trip(tmp_path) -> None:
    results = mixed()
    path = tmp_path / "gpumem.json"
    path.write_text(json_report.dumps(json_report.build(results, ENV)))
    environment, loaded = json_report.load(path)
    assert environment == ENV
    assert loaded == sorted(results, key=lambda r: r.nodeid)
    assert json_report.build(loaded, environment) == json_report.build(results, ENV)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "pytest-gpumem/results/v0", "tests": []}', "found schema 'pytest-gpumem/results/v0'"),
        ("[1, 2]", "found schema None"),
        ('{"schema": "pytest-gpumem/results/v1", "environment": {}, "tests": [{"nodeid": "x"}]}', "malformed"),
    ],
)
def test_json_load_rejects(tmp_path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        json_report.load(path)
    assert str(info.value).startswith(str(path) + ": ")
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- Markdown


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table line, splitting on pipes that are not escaped."""
    rows = []
    for line in text.splitlines():
        if line.startswith("|"):
            cells = line.replace("\\|", "\0").strip().strip("|").split("|")
            rows.append([c.strip().replace("\0", "|") for c in cells])
    return rows


def test_markdown_exact() -> None:
    results = [
        result("t.py::ok", "ok", GiB, GiB, allowed=20 * MiB, software_changes=("transformers 4.57.6 -> 5.0.0",)),
        result("t.py::reg", "regression", GiB + 64 * MiB, GiB, budget=6 * GiB, allowed=20 * MiB),
    ]
    assert markdown.render(results, ENV) == (
        "### gpumem: 1 regression, 1 ok\n"
        "\n"
        "**Dependencies changed** since the baselines: transformers 4.57.6 -> 5.0.0\n"
        "\n"
        "| test | metric | cost | verdict |\n"
        "| --- | --- | ---: | --- |\n"
        "| `t.py::ok` | allocated | +0 B (+0.0%) | ok |\n"
        "\n"
        "backend `cpu`, hardware `cpu`; torch 2.5.1, transformers 5.0.0, peft 0.13.2\n"
        "\n"
        "| test | metric | peak | baseline | delta | budget | verdict | largest consumer |\n"
        "| --- | --- | ---: | ---: | ---: | ---: | --- | --- |\n"
        "| `t.py::reg` | allocated | 1.06 GiB | 1.00 GiB | +64.00 MiB (+6.2%) | 6.00 GiB | **regression** | - |\n"
        "| `t.py::ok` | allocated | 1.00 GiB | 1.00 GiB | +0 B (+0.0%) | - | ok | - |\n"
        "\n"
        "- software changed since baselines: transformers 4.57.6 -> 5.0.0 (1 test)\n"
        "\n"
        "sizes in binary units (1 GiB = 2^30 bytes)\n"
    )


def test_markdown_table_shape() -> None:
    rows = table_rows(markdown.render(mixed(), ENV))
    assert rows[0] == ["test", "metric", "peak", "baseline", "delta", "budget", "verdict", "largest consumer"]
    assert rows[1] == ["---", "---", "---:", "---:", "---:", "---:", "---", "---"]
    assert len(rows) == 2 + len(mixed())
    assert all(len(row) == 8 for row in rows)
    assert [row[0] for row in rows[2:]] == [
        f"`t.py::{n}`" for n in ("oom", "over", "regression", "improved", "new", "ok")
    ]
    assert [row[6] for row in rows[2:]] == ["**oom**", "**over budget**", "**regression**", "improved", "new", "ok"]
    assert [row[7] for row in rows[2:]] == ["-"] * 6  # no attribution; only the verdict is bold


def test_markdown_escapes_pipes_in_nodeids() -> None:
    rows = table_rows(markdown.render([result("t.py::test[a|b]", "ok", MiB, MiB)], ENV))
    assert rows[2][0] == "`t.py::test[a|b]`"
    assert len(rows[2]) == 8


@pytest.mark.parametrize(
    ("statuses", "heading"),
    [
        (["ok", "new", "improved"], "### gpumem: all 3 within budget and baseline"),
        (["ok", "regression", "regression", "over_budget"], "### gpumem: 2 regressions, 1 over budget, 1 ok"),
    ],
)
def test_markdown_heading(statuses: list[str], heading: str) -> None:
    text = markdown.render([result(f"t{i}", s, MiB, MiB) for i, s in enumerate(statuses)], ENV)
    assert text.splitlines()[0] == heading


def test_markdown_warn_only() -> None:
    text = markdown.render(mixed(), ENV, warn_only=True)
    lines = text.splitlines()
    assert (
        lines[0] == "### gpumem: 1 regression, 1 over budget, 1 out of memory, 1 improved, 1 new, 1 ok (not enforced)"
    )
    rows = [row for row in table_rows(text) if len(row) == 8]  # the results table, not the dependencies one
    assert [row[6] for row in rows[2:5]] == [
        "**oom (warn)**",
        "**over budget (warn)**",
        "**regression (warn)**",
    ]
    assert "- warn-only: 3 memory failures reported but not enforced" in lines


def test_markdown_notes_and_footnote() -> None:
    lines = markdown.render(mixed(), ENV).splitlines()
    assert lines[-1] == "sizes in binary units (1 GiB = 2^30 bytes)"
    assert [line for line in lines if line.startswith("- ")] == [
        "- 1 new test without baselines for hardware cpu; baselines exist for: H100-80GB",
        "- improved or new results: review them and record baselines with --gpumem-update-baselines",
    ]


def test_markdown_environment_line_names_only_installed_packages() -> None:
    env = {"backend": "cuda", "hardware": "NVIDIA-H100-80GB", "software": {"bitsandbytes": "0.45.0", "torch": "2.6.0"}}
    assert markdown.render([], env).splitlines() == [
        "### gpumem: no tests measured",
        "",
        "backend `cuda`, hardware `NVIDIA-H100-80GB`; torch 2.6.0, bitsandbytes 0.45.0",
    ]


def test_markdown_environment_line_reads_the_plugins_environment():
    """The plugin (and gpumem merge) write lists: ``backends`` and ``hardware``."""
    env = {"backends": ["cpu", "cuda"], "hardware": ["cpu", "NVIDIA-H100-80GB"], "software": {"torch": "2.6.0"}}
    text = markdown.render([result("t.py::a", "ok", 10 * MiB, 10 * MiB)], env)
    assert "backend `cpu, cuda`, hardware `cpu, NVIDIA-H100-80GB`; torch 2.6.0" in text
