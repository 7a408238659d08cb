"""Budgets and baselines per device: the marker's arguments, the judge fed given numbers, the reports of a
test measured on several devices, baselines through the store, and the plugin end to end."""

from __future__ import annotations

import json
import pickle

import pytest

from pytest_gpumem.config.marker import MARKER_HELP, parse_marker
from pytest_gpumem.core.judge import judge, needed
from pytest_gpumem.core.sample import (
    Baseline,
    DeviceVerdict,
    OutOfMemory,
    Sample,
    Spec,
    TestResult,
    Verdict,
    touched,
)
from pytest_gpumem.core.store import BaselineStore
from pytest_gpumem.core.units import BadValue, Tolerance
from pytest_gpumem.report import json_report, markdown, terminal
from pytest_gpumem.report.table import cells, device_rows

MiB = 2**20
GiB = 2**30
TWO_PERCENT = Tolerance(percent=2.0)


def sample(call: dict[str, int], metric: str = "allocated") -> Sample:
    return Sample(backend="cuda", phases={"call": {metric: dict(call)}})


def baseline(metrics: dict[str, int]) -> Baseline:
    return Baseline(
        metrics={"allocated": dict(metrics)},
        phases={},
        software={"torch": "2.5.1"},
        recorded="2025-11-20",
        backend="cuda",
    )


def verdict_of(
    now: dict[str, int], base: dict[str, int] | None, oom: OutOfMemory | None = None, **spec: object
) -> Verdict:
    return judge(sample(now), Spec(**spec), baseline(base) if base is not None else None, {"torch": "2.5.1"}, oom=oom)


# ---------------------------------------------------------------- marker


def parse(**kwargs: object) -> Spec:
    return parse_marker(
        (), kwargs, default_tolerance=TWO_PERCENT, metrics=("allocated", "reserved"), backend="cuda", where="m"
    )


def test_marker_budget_per_device_and_exclusive() -> None:
    spec = parse(budget="4 GiB", budget_per_device={1: "1 GiB", "rank0:cuda:0": 512, "cuda:10": "2 MiB"})
    assert spec.budget_per_device == (("cuda:1", GiB), ("cuda:10", 2 * MiB), ("rank0:cuda:0", 512))
    assert spec.exclusive is False
    assert parse(exclusive=True).exclusive is True
    assert parse() == Spec(tolerance=TWO_PERCENT)  # the defaults: no per-device budget, not exclusive
    # Spec stays immutable and travels
    assert hash(spec) == hash(pickle.loads(pickle.dumps(spec)))
    assert "budget_per_device: Mapping[str | int, int | str] | None = None, exclusive: bool = False" in MARKER_HELP
    assert "budget_per_device: a ceiling per device" in MARKER_HELP


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget_per_device": ["cuda:0"]}, "m: budget_per_device: expected a mapping such as"),
        ({"budget_per_device": {"cuda1": "1 GiB"}}, "m: budget_per_device: 'cuda1' is not a device; write"),
        ({"budget_per_device": {"cuda": "1 GiB"}}, "m: budget_per_device: 'cuda' is not a device"),
        ({"budget_per_device": {-1: "1 GiB"}}, "m: budget_per_device: -1 is not a device"),
        ({"budget_per_device": {True: "1 GiB"}}, "m: budget_per_device: True is not a device"),
        ({"budget_per_device": {"cuda:0": "abc"}}, "m: budget_per_device['cuda:0']: 'abc' is not a size"),
        ({"budget_per_device": {1: -5}}, "m: budget_per_device[1]: a size cannot be negative, got -5"),
        ({"budget_per_device": {1: "1 GiB", "cuda:1": "2 GiB"}}, "m: budget_per_device: cuda:1 is given twice"),
        ({"exclusive": "yes"}, "m: exclusive: expected True or False, got 'yes'"),
        ({"exclusive": 1}, "m: exclusive: expected True or False, got 1"),
    ],
)
def test_marker_bad_values_name_the_marker_and_the_value(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(BadValue) as raised:
        parse(**kwargs)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_spec_device_budget_is_the_lower_of_both() -> None:
    spec = Spec(budget=4 * GiB, budget_per_device=(("cuda:1", GiB), ("cuda:2", 8 * GiB)))
    assert [spec.device_budget(d) for d in ("cuda:0", "cuda:1", "cuda:2")] == [4 * GiB, GiB, 4 * GiB]
    assert Spec().device_budget("cuda:0") is None


# ---------------------------------------------------------------- judge: one device, as before


@pytest.mark.parametrize(
    ("value", "base", "budget", "expected"),
    [
        (GiB, GiB, None, ("ok", GiB, 2 * GiB // 100, None)),
        (GiB + 64 * MiB, GiB, None, ("regression", GiB, 2 * GiB // 100, None)),
        (GiB, 2 * GiB, None, ("improved", 2 * GiB, 4 * GiB // 100, None)),
        (7 * GiB, None, 6 * GiB, ("over_budget", None, None, 6 * GiB)),
        (7 * GiB, 7 * GiB, 6 * GiB, ("over_budget", 7 * GiB, 14 * GiB // 100, 6 * GiB)),
        (5 * MiB, None, None, ("new", None, None, None)),
    ],
)
def test_single_device_verdicts_are_unchanged(
    value: int, base: int | None, budget: int | None, expected: tuple[object, ...]
) -> None:
    verdict = verdict_of({"cuda:0": value}, {"cuda:0": base} if base is not None else None, budget=budget)
    assert (verdict.status, verdict.baseline, verdict.allowed, verdict.budget) == expected
    assert (verdict.value, verdict.device, verdict.devices) == (value, "cuda:0", [])
    data = verdict.to_dict()
    assert "devices" not in data and data["device"] == "cuda:0"


def test_nothing_measured_and_no_baseline_is_new_on_no_device() -> None:
    verdict = judge(Sample(backend="cpu"), Spec(budget=GiB), None, {})
    assert (verdict.status, verdict.value, verdict.budget, verdict.device, verdict.devices) == ("new", 0, GiB, None, [])


# ---------------------------------------------------------------- judge: several devices


@pytest.mark.parametrize(
    ("now", "base", "spec", "expected"),
    [
        pytest.param(  # the largest device did not grow, cuda:1 did: comparing maxima would miss it
            {"cuda:0": 2 * GiB, "cuda:1": 3 * GiB // 2},
            {"cuda:0": 2 * GiB, "cuda:1": GiB},
            {},
            ("regression", "cuda:1", 3 * GiB // 2, GiB, 2 * GiB // 100, None),
            id="regression-on-the-smaller-device",
        ),
        pytest.param(  # the load moved between devices: the grown one decides, the shrunk one is improved
            {"cuda:0": GiB, "cuda:1": 2 * GiB},
            {"cuda:0": 2 * GiB, "cuda:1": GiB},
            {},
            ("regression", "cuda:1", 2 * GiB, GiB, 2 * GiB // 100, None),
            id="swapped-load",
        ),
        pytest.param(  # a device the baseline lacks grows from nothing
            {"cuda:0": GiB, "cuda:1": 10 * MiB},
            {"cuda:0": GiB},
            {},
            ("regression", "cuda:1", 10 * MiB, 0, 0, None),
            id="not-in-the-baseline",
        ),
        pytest.param(  # ... within the tolerance's floor it is fine, and the largest device is named
            {"cuda:0": GiB, "cuda:1": 10 * MiB},
            {"cuda:0": GiB},
            {"tolerance": Tolerance(percent=2.0, floor=16 * MiB)},
            ("ok", "cuda:0", GiB, GiB, 2 * GiB // 100, None),
            id="not-in-the-baseline-within-floor",
        ),
        pytest.param(  # a device no longer used counts 0 now
            {"cuda:0": GiB},
            {"cuda:0": GiB, "cuda:1": GiB},
            {},
            ("improved", "cuda:1", 0, GiB, 2 * GiB // 100, None),
            id="device-gone",
        ),
        pytest.param(  # the one that shrank most beyond its allowance decides
            {"cuda:0": GiB, "cuda:1": GiB, "cuda:2": GiB},
            {"cuda:0": GiB + 100 * MiB, "cuda:1": 2 * GiB, "cuda:2": GiB},
            {},
            ("improved", "cuda:1", GiB, 2 * GiB, 4 * GiB // 100, None),
            id="improved",
        ),
        pytest.param(  # budget holds for the largest device
            {"cuda:0": 3 * GiB // 2, "cuda:1": 3 * GiB},
            {"cuda:0": 3 * GiB // 2, "cuda:1": 3 * GiB},
            {"budget": GiB},
            ("over_budget", "cuda:1", 3 * GiB, 3 * GiB, 6 * GiB // 100, GiB),
            id="budget-on-the-largest",
        ),
        pytest.param(  # a device's own budget; over budget beats a regression elsewhere
            {"cuda:0": 3 * GiB, "cuda:1": 2 * GiB},
            {"cuda:0": GiB, "cuda:1": 2 * GiB},
            {"budget": 4 * GiB, "budget_per_device": (("cuda:1", GiB),)},
            ("over_budget", "cuda:1", 2 * GiB, 2 * GiB, 4 * GiB // 100, GiB),
            id="budget-per-device",
        ),
        pytest.param(  # the device furthest over its budget decides, not the largest
            {"cuda:0": 2 * GiB, "cuda:1": 9 * GiB // 2},
            None,
            {"budget": 4 * GiB, "budget_per_device": (("cuda:0", GiB),)},
            ("over_budget", "cuda:0", 2 * GiB, None, None, GiB),
            id="furthest-over",
        ),
        pytest.param(  # per-rank keys are devices like any other
            {"rank0:cuda:0": GiB, "rank1:cuda:0": GiB + 100 * MiB},
            {"rank0:cuda:0": GiB, "rank1:cuda:0": GiB},
            {},
            ("regression", "rank1:cuda:0", GiB + 100 * MiB, GiB, 2 * GiB // 100, None),
            id="ranks",
        ),
        pytest.param(
            {"cuda:0": GiB, "cuda:1": 2 * GiB},
            None,
            {},
            ("new", "cuda:1", 2 * GiB, None, None, None),
            id="new",
        ),
    ],
)
def test_several_devices(
    now: dict[str, int], base: dict[str, int] | None, spec: dict[str, object], expected: tuple[object, ...]
) -> None:
    verdict = verdict_of(now, base, **spec)
    assert (verdict.status, verdict.device, verdict.value, verdict.baseline, verdict.allowed, verdict.budget) == (
        expected
    )
    assert [row.device for row in verdict.devices] == sorted(set(now) | set(base or {}))
    row = verdict.row()
    assert row is not None and (row.value, row.baseline, row.allowed, row.budget) == expected[2:]


def test_several_devices_rows_and_needed() -> None:
    verdict = verdict_of(
        {"cuda:0": 3 * GiB, "cuda:1": 2 * GiB, "cuda:2": 10 * MiB},
        {"cuda:0": GiB, "cuda:1": 2 * GiB, "cuda:3": 5 * MiB},
        budget=4 * GiB,
        budget_per_device=(("cuda:1", GiB),),
    )
    assert verdict.devices == [
        DeviceVerdict("cuda:0", 3 * GiB, GiB, 2 * GiB // 100, 4 * GiB, "regression"),
        DeviceVerdict("cuda:1", 2 * GiB, 2 * GiB, 4 * GiB // 100, GiB, "over_budget"),
        DeviceVerdict("cuda:2", 10 * MiB, 0, 0, 4 * GiB, "regression", in_baseline=False),
        DeviceVerdict("cuda:3", 0, 5 * MiB, 10 * MiB // 100, 4 * GiB, "improved"),
    ]
    assert needed(verdict) == GiB  # what cuda:1 must give back
    regression = verdict_of({"cuda:0": 2 * GiB, "cuda:1": 3 * GiB // 2}, {"cuda:0": 2 * GiB, "cuda:1": GiB})
    assert needed(regression) == GiB // 2 - (2 * GiB // 100)


def test_only_the_devices_a_phase_used_are_kept() -> None:
    peaks = {
        "allocated": {"cuda:0": 0, "cuda:1": 5 * MiB, "cuda:2": 0},
        "reserved": {"cuda:0": 0, "cuda:1": 6 * MiB, "cuda:2": 2 * MiB},  # a cache segment: used
        "device": {"cuda:0": 9 * MiB, "cuda:1": 8 * MiB, "cuda:2": 2 * MiB},  # NVML alone does not count
    }
    assert touched(peaks, "cuda:0") == {
        "allocated": {"cuda:1": 5 * MiB, "cuda:2": 0},
        "reserved": {"cuda:1": 6 * MiB, "cuda:2": 2 * MiB},
        "device": {"cuda:1": 8 * MiB, "cuda:2": 2 * MiB},
    }
    unused = {"allocated": {"cuda:0": 0, "cuda:1": 0}, "reserved": {"cuda:0": 0, "cuda:1": 0}}
    assert touched(unused, "cuda:0") == {"allocated": {"cuda:0": 0}, "reserved": {"cuda:0": 0}}


def test_device_order_is_numeric() -> None:
    verdict = verdict_of({"cuda:10": 1, "cuda:2": 1, "cpu": 1, "rank10:cuda:0": 1, "rank2:cuda:0": 1}, None)
    assert [row.device for row in verdict.devices] == ["cpu", "cuda:2", "cuda:10", "rank2:cuda:0", "rank10:cuda:0"]
    assert verdict.device == "cpu"  # the largest, first in order on a tie


def test_oom_names_the_device_that_ran_out() -> None:
    oom = OutOfMemory(device="cuda:1", requested=GiB)
    verdict = verdict_of({"cuda:0": 2 * GiB, "cuda:1": GiB}, {"cuda:0": 2 * GiB, "cuda:1": GiB}, oom=oom)
    assert (verdict.status, verdict.device, verdict.value) == ("oom", "cuda:1", GiB)


def test_verdict_round_trip_and_old_dicts() -> None:
    verdict = verdict_of({"cuda:0": GiB, "cuda:1": 10 * MiB}, {"cuda:0": GiB}, budget=2 * GiB)
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["device"] == "cuda:1" and len(data["devices"]) == 2
    assert data["devices"][1] == {
        "device": "cuda:1",
        "value": 10 * MiB,
        "baseline": 0,
        "allowed": 0,
        "budget": 2 * GiB,
        "status": "regression",
        "in_baseline": False,
    }
    assert Verdict.from_dict(data) == verdict
    old = {k: v for k, v in data.items() if k not in ("device", "devices")}  # written before per-device verdicts
    assert Verdict.from_dict(old) == Verdict(**{**old, "oom": None})


# ---------------------------------------------------------------- baselines through the store


def test_multi_device_baseline_round_trips_through_the_store_and_is_judged_per_device(tmp_path) -> None:
    peaks = {
        "allocated": {"rank0:cuda:0": 2 * GiB, "rank1:cuda:0": GiB},
        "reserved": {"rank0:cuda:0": 3 * GiB, "rank1:cuda:0": 2 * GiB},
    }
    stored = Baseline(metrics=peaks, phases={"call": peaks}, software={"torch": "2.5.1"}, recorded="r", backend="cuda")
    BaselineStore(tmp_path).update("H100", {"t.py::ddp": stored})
    loaded = BaselineStore(tmp_path).lookup("H100", "t.py::ddp")
    assert loaded == stored
    now = Sample(backend="cuda", phases={"call": {"allocated": {"rank0:cuda:0": 2 * GiB, "rank1:cuda:0": 2 * GiB}}})
    verdict = judge(now, Spec(), loaded, {"torch": "2.5.1"})
    assert (verdict.status, verdict.device, verdict.baseline) == ("regression", "rank1:cuda:0", GiB)


# ---------------------------------------------------------------- reports


def result(nodeid: str, now: dict[str, int], base: dict[str, int] | None, **spec: object) -> TestResult:
    stored = baseline(base) if base is not None else None
    verdict = judge(sample(now), Spec(**spec), stored, {"torch": "2.5.1"})
    return TestResult(nodeid=nodeid, hardware="H100", sample=sample(now), verdict=verdict, passed=True, baseline=stored)


def regressed(nodeid: str = "t.py::ddp") -> TestResult:
    return result(
        nodeid,
        {"cuda:0": 2 * GiB, "cuda:1": 3 * GiB // 2, "cuda:2": 10 * MiB},
        {"cuda:0": 2 * GiB, "cuda:1": GiB},
        budget_per_device=(("cuda:0", 4 * GiB),),
    )


def test_failure_message_names_the_device_and_breaks_down_per_device() -> None:
    assert terminal.failure_message(regressed()) == (
        "gpumem: regression over baseline on cuda:1 (allocated peak, cuda backend, hardware H100)\n"
        "  peak      1.50 GiB (1610612736 B) on cuda:1\n"
        "  baseline  1.00 GiB (1073741824 B) recorded 2025-11-20 with torch 2.5.1\n"
        "  delta     +512.00 MiB (+50.0%), tolerance 2% allows +20.48 MiB\n"
        "  devices\n"
        "    device        now             baseline                 delta    budget  verdict\n"
        "    ------  ---------  -------------------  --------------------  --------  ----------\n"
        "    cuda:0   2.00 GiB             2.00 GiB          +0 B (+0.0%)  4.00 GiB  ok\n"
        "    cuda:1   1.50 GiB             1.00 GiB  +512.00 MiB (+50.0%)         -  regression\n"
        "    cuda:2  10.00 MiB  not in the baseline            +10.00 MiB         -  regression\n"
        "  phases    call 2.00 GiB"
    )


def test_failure_message_of_a_device_not_in_the_baseline() -> None:
    r = result("t.py::ddp", {"cuda:0": GiB, "cuda:1": 10 * MiB}, {"cuda:0": GiB})
    lines = terminal.failure_message(r).splitlines()
    assert lines[0] == "gpumem: regression over baseline on cuda:1 (allocated peak, cuda backend, hardware H100)"
    assert lines[2:4] == [
        "  baseline  0 B: cuda:1 is not in the baseline recorded 2025-11-20 with torch 2.5.1",
        "  delta     +10.00 MiB, tolerance 2% allows +0 B",
    ]


def test_failure_message_over_budget_on_a_device() -> None:
    r = result("t.py::ddp", {"cuda:0": 3 * GiB, "cuda:1": 2 * GiB}, None, budget_per_device=(("cuda:1", GiB),))
    lines = terminal.failure_message(r).splitlines()
    assert lines[0] == "gpumem: over budget on cuda:1 (allocated peak, cuda backend, hardware H100)"
    assert lines[1] == "  peak      2.00 GiB (2147483648 B) on cuda:1"
    assert lines[3] == "  budget    1.00 GiB, exceeded by 1.00 GiB"
    assert device_rows(r.verdict) == [
        ["cuda:0", "3.00 GiB", "-", "-", "-", "new"],
        ["cuda:1", "2.00 GiB", "-", "-", "1.00 GiB", "over budget"],
    ]


def test_summary_names_the_device_and_shows_the_breakdown() -> None:
    single = result("t::one", {"cuda:0": GiB}, {"cuda:0": GiB})
    fine = result("t::fine", {"cuda:0": GiB, "cuda:1": GiB}, {"cuda:0": GiB, "cuda:1": GiB})
    lines = terminal.summary_lines([single, fine, regressed("t::ddp")])
    assert lines[:5] == [
        "test     metric         peak  baseline                 delta  budget  verdict               largest consumer",
        "-------  ---------  --------  --------  --------------------  ------  --------------------  ----------------",
        "t::ddp   allocated  1.50 GiB  1.00 GiB  +512.00 MiB (+50.0%)       -  regression on cuda:1  -",
        "t::fine  allocated  1.00 GiB  1.00 GiB          +0 B (+0.0%)       -  ok                    -",
        "t::one   allocated  1.00 GiB  1.00 GiB          +0 B (+0.0%)       -  ok                    -",
    ]
    # only the test decided on one device is broken down; one that is fine on every device is not
    assert lines[5:11] == [
        "t::ddp:",
        "  device        now             baseline                 delta    budget  verdict",
        "  ------  ---------  -------------------  --------------------  --------  ----------",
        "  cuda:0   2.00 GiB             2.00 GiB          +0 B (+0.0%)  4.00 GiB  ok",
        "  cuda:1   1.50 GiB             1.00 GiB  +512.00 MiB (+50.0%)         -  regression",
        "  cuda:2  10.00 MiB  not in the baseline            +10.00 MiB         -  regression",
    ]
    assert lines[11:] == ["sizes in binary units (1 GiB = 2^30 bytes)", "1 regression, 2 ok"]
    assert cells(regressed(), warn_only=True)[6] == "regression on cuda:1 (warn)"


def test_markdown_names_the_device_and_shows_the_breakdown() -> None:
    text = markdown.render([regressed()], {"backend": "cuda", "hardware": "H100"})
    row = "| `t.py::ddp` | allocated | 1.50 GiB | 1.00 GiB | +512.00 MiB (+50.0%) | - | **regression on cuda:1** | - |"
    assert row in text.splitlines()
    block = text[text.index("<details>") : text.index("</details>")].splitlines()
    assert block == [
        "<details><summary><code>t.py::ddp</code>: regression on cuda:1</summary>",
        "",
        "| device | now | baseline | delta | budget | verdict |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        "| cuda:0 | 2.00 GiB | 2.00 GiB | +0 B (+0.0%) | 4.00 GiB | ok |",
        "| cuda:1 | 1.50 GiB | 1.00 GiB | +512.00 MiB (+50.0%) | - | regression |",
        "| cuda:2 | 10.00 MiB | not in the baseline | +10.00 MiB | - | regression |",
        "",
    ]


def test_json_carries_the_device_and_the_rows(tmp_path) -> None:
    single = result("t.py::one", {"cuda:0": GiB}, {"cuda:0": GiB})
    doc = json_report.build([single, regressed()], {"backend": "cuda"})
    by_id = {t["nodeid"]: t for t in doc["tests"]}
    assert by_id["t.py::one"]["verdict"]["device"] == "cuda:0" and "devices" not in by_id["t.py::one"]["verdict"]
    assert by_id["t.py::ddp"]["verdict"]["device"] == "cuda:1"
    assert [row["status"] for row in by_id["t.py::ddp"]["verdict"]["devices"]] == ["ok", "regression", "regression"]
    path = tmp_path / "out.json"
    path.write_text(json_report.dumps(doc))
    _, loaded = json_report.load(path)
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in (regressed(), single)]


# ---------------------------------------------------------------- the plugin end to end

FAKE_DEVICES = """
import pytest
from pytest_gpumem.plugin import PLUGIN

EXTRA = {}  # bytes the test says it used on devices the cpu backend cannot see


@pytest.hookimpl(trylast=True)
def pytest_configure(config):
    meter = config.stash[PLUGIN].context.meter
    real = meter.mark

    def mark():
        peaks = real()
        for device, n in EXTRA.items():
            peaks.setdefault("allocated", {})[device] = n
        EXTRA.clear()
        return peaks

    meter.mark = mark


@pytest.fixture
def on_devices():
    return EXTRA
"""

SUITE = """
import pytest, torch

@pytest.mark.gpumem{marker}
def test_ddp(on_devices):
    x = torch.empty(2**20, dtype=torch.uint8)
    on_devices.update({{"rank0:cuda:0": {rank0}, "rank1:cuda:0": {rank1}}})
"""


def run(pytester: pytest.Pytester, rank1: int, *args: str, marker: str = "") -> tuple[pytest.RunResult, dict]:
    pytester.makepyfile(test_ddp=SUITE.format(marker=marker, rank0=2 * MiB, rank1=rank1))
    outcome = pytester.runpytest("--gpumem-json=out.json", *args)
    return outcome, json.loads((pytester.path / "out.json").read_text())["tests"][0]


def test_plugin_records_and_judges_per_device(pytester) -> None:
    """The cpu meter is fed extra per-rank peaks (as a multi-process test would report them): the baseline
    stores every device, and a regression on one rank fails the test naming that rank."""
    pytester.makeconftest(FAKE_DEVICES)
    outcome, _ = run(pytester, 2 * MiB, "--gpumem-update-baselines")
    outcome.assert_outcomes(passed=1)
    stored = json.loads((pytester.path / "baselines" / "cpu.json").read_text())["tests"]["test_ddp.py::test_ddp"]
    assert stored["metrics"]["allocated"] == {"cpu": MiB, "rank0:cuda:0": 2 * MiB, "rank1:cuda:0": 2 * MiB}

    outcome, test = run(pytester, 3 * MiB)
    outcome.assert_outcomes(failed=1)
    assert test["verdict"]["device"] == "rank1:cuda:0"
    assert [row["status"] for row in test["verdict"]["devices"]] == ["ok", "ok", "regression"]
    outcome.stdout.fnmatch_lines(
        [
            "*gpumem: regression over baseline on rank1:cuda:0 (allocated peak, cpu backend, hardware cpu)",
            "    rank1:cuda:0  3.00 MiB  2.00 MiB  +1.00 MiB (+50.0%)       -  regression",
            "test_ddp.py::test_ddp  allocated  3.00 MiB  2.00 MiB*regression on rank1:cuda:0*",
        ]
    )

    outcome, test = run(pytester, 2 * MiB, marker='(budget_per_device={"rank0:cuda:0": "1 MiB"})')
    outcome.assert_outcomes(failed=1)
    assert (test["verdict"]["status"], test["verdict"]["device"]) == ("over_budget", "rank0:cuda:0")
    outcome.stdout.fnmatch_lines(["*gpumem: over budget on rank0:cuda:0*"])


def test_plugin_budget_per_device_on_a_single_device(pytester) -> None:
    """On one device a per-device budget is that device's ceiling; the report reads as a plain budget's."""
    pytester.makepyfile(
        test_one="""
        import pytest, torch

        @pytest.mark.gpumem(budget_per_device={"cpu": "2 MiB"}, exclusive=True)
        def test_fits():
            x = torch.empty(2**20, dtype=torch.uint8)

        @pytest.mark.gpumem(budget="8 MiB", budget_per_device={"cpu": "512 KiB"})
        def test_over():
            x = torch.empty(2**20, dtype=torch.uint8)
        """
    )
    outcome = pytester.runpytest()
    outcome.assert_outcomes(passed=1, failed=1)
    outcome.stdout.fnmatch_lines(
        [
            "gpumem: over budget (allocated peak, cpu backend, hardware cpu)",
            "  budget    512.00 KiB, exceeded by 512.00 KiB",
        ]
    )
