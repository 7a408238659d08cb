"""Dashboard exports: Bencher Metric Format and github-action-benchmark, from given numbers and a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pytest_gpumem.ci.export import FORMATS, Export, bmf, gab, parse_exports, render
from pytest_gpumem.core.sample import Baseline, Sample, TestResult, Verdict
from pytest_gpumem.core.units import BadValue

MiB = 2**20


def result(nodeid: str, peaks: dict[str, int], status: str = "ok", baseline: int | None = None, hardware: str = "H100"):
    """A TestResult whose call phase peaked at ``peaks`` (bytes per metric) on cuda:0 and cuda:1 (half there)."""
    call = {metric: {"cuda:0": value, "cuda:1": value // 2} for metric, value in peaks.items()}
    stored = None
    if baseline is not None:
        stored = Baseline(
            metrics={"allocated": {"cuda:0": baseline}}, phases={}, software={}, recorded="", backend="cuda"
        )
    verdict = Verdict(
        status=status, metric="allocated", value=peaks.get("allocated"), baseline=baseline, budget=8 * MiB
    )
    return TestResult(nodeid, hardware, Sample("cuda", phases={"call": call}), verdict, True, stored)


RESULTS = [
    result("t.py::b", {"allocated": 3 * MiB, "reserved": 4 * MiB, "device": 5 * MiB}, "regression", 2 * MiB),
    result("t.py::a", {"allocated": MiB, "reserved": 2 * MiB}),
]


def test_bmf_has_one_measure_per_test_and_metric_in_bytes():
    assert bmf(RESULTS) == {
        "t.py::a": {"gpumem-allocated": {"value": MiB}, "gpumem-reserved": {"value": 2 * MiB}},
        "t.py::b": {
            "gpumem-allocated": {"value": 3 * MiB},
            "gpumem-reserved": {"value": 4 * MiB},
            "gpumem-device": {"value": 5 * MiB},
        },
    }


def test_bmf_matches_benchers_schema_shape():
    """Bencher's BMF schema: an object of benchmarks, each an object of measures, each with a numeric value."""
    for measures in json.loads(render("bmf", RESULTS)).values():
        for metric in measures.values():
            assert set(metric) <= {"value", "lower_value", "upper_value"}
            assert isinstance(metric["value"], (int, float))


def test_gab_is_a_list_of_name_unit_value_extra_sorted():
    doc = gab(RESULTS)
    assert [e["name"] for e in doc] == [
        "t.py::a (allocated)",
        "t.py::a (reserved)",
        "t.py::b (allocated)",
        "t.py::b (reserved)",
        "t.py::b (device)",
    ]
    assert all(set(e) == {"name", "unit", "value", "extra"} and e["unit"] == "bytes" for e in doc)
    assert [e["value"] for e in doc] == [MiB, 2 * MiB, 3 * MiB, 4 * MiB, 5 * MiB]
    # the judged metric's tooltip carries the verdict; a metric only read does not
    assert doc[2]["extra"] == "hardware H100, cuda backend\nbaseline 2.00 MiB\nbudget 8.00 MiB\nverdict regression"
    assert doc[3]["extra"] == "hardware H100, cuda backend"


def test_names_carry_the_hardware_only_when_results_span_several():
    mixed = [result("t.py::a", {"allocated": MiB}), result("t.py::a", {"allocated": 2 * MiB}, hardware="cpu")]
    assert sorted(bmf(mixed)) == ["t.py::a [H100]", "t.py::a [cpu]"]


def test_a_test_without_values_exports_nothing():
    oom = TestResult("t.py::oom", "H100", Sample("cuda"), Verdict("oom", "allocated", None), True)
    assert bmf([oom]) == {} and gab([oom]) == []


def test_render_is_deterministic_json():
    text = render("gab", RESULTS)
    assert text.endswith("\n") and text == render("gab", list(reversed(RESULTS)))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bmf=out/bmf.json", (Export("bmf", Path("/base/out/bmf.json")),)),
        (
            " bmf = a.json , GAB=/abs/b.json ",
            (Export("bmf", Path("/base/a.json")), Export("gab", Path("/abs/b.json"))),
        ),
    ],
)
def test_parse_exports(value, expected):
    assert parse_exports(value, "--gpumem-export", Path("/base")) == expected


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bmf", "--gpumem-export: 'bmf' is not FORMAT=PATH; e.g. bmf=gpumem-bmf.json"),
        ("csv=x.csv", "--gpumem-export: unknown export format 'csv' in 'csv=x.csv'; choose one of bmf, gab"),
        ("bmf=a.json,gab=", "--gpumem-export: 'gab=' names no file to write the gab export to"),
        ("", "--gpumem-export: expected FORMAT=PATH (formats: bmf, gab), got ''"),
    ],
)
def test_parse_exports_errors_name_the_item_and_source(value, message):
    with pytest.raises(BadValue) as info:
        parse_exports(value, "--gpumem-export")
    assert str(info.value) == message


# -- through the plugin


SUITE = """
import pytest, torch

@pytest.mark.gpumem
@pytest.mark.parametrize("mib", [1, 2])
def test_alloc(mib):
    x = torch.empty(mib * 2**20, dtype=torch.uint8)
"""


def test_plugin_writes_both_exports(pytester):
    pytester.makepyfile(test_mem=SUITE)
    result = pytester.runpytest("--gpumem-export=bmf=out/bmf.json,gab=out/gab.json")
    result.assert_outcomes(passed=2)
    assert json.loads((pytester.path / "out" / "bmf.json").read_text()) == {
        "test_mem.py::test_alloc[1]": {"gpumem-allocated": {"value": MiB}, "gpumem-reserved": {"value": MiB}},
        "test_mem.py::test_alloc[2]": {"gpumem-allocated": {"value": 2 * MiB}, "gpumem-reserved": {"value": 2 * MiB}},
    }
    entries = json.loads((pytester.path / "out" / "gab.json").read_text())
    assert [(e["name"], e["value"]) for e in entries] == [
        ("test_mem.py::test_alloc[1] (allocated)", MiB),
        ("test_mem.py::test_alloc[1] (reserved)", MiB),
        ("test_mem.py::test_alloc[2] (allocated)", 2 * MiB),
        ("test_mem.py::test_alloc[2] (reserved)", 2 * MiB),
    ]
    assert entries[0]["extra"] == "hardware cpu, cpu backend\nverdict new"


def test_plugin_export_from_the_environment(pytester, monkeypatch):
    pytester.makepyfile(test_mem=SUITE)
    monkeypatch.setenv("GPUMEM_EXPORT", "gab=gab.json")
    pytester.runpytest().assert_outcomes(passed=2)
    assert len(json.loads((pytester.path / "gab.json").read_text())) == 4


def test_plugin_bad_export_stops_the_run_naming_it(pytester):
    pytester.makepyfile(test_mem=SUITE)
    result = pytester.runpytest("--gpumem-export=junit=x.xml")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--gpumem-export: unknown export format 'junit' in 'junit=x.xml'; choose one of bmf, gab"]
    )


def test_formats_are_the_documented_ones():
    assert FORMATS == ("bmf", "gab")
