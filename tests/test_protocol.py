"""Where the plugin does its work in pytest's protocol: the advisor's re-runs inside the test's call phase
(under pytest's capture), and the results on the reports as attributes (not ``user_properties``, which
JUnit XML would print)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

pytest_plugins = ["pytester"]

TRAIN = """
import pytest
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(256, 256, bias=False)
        self.b = torch.nn.Linear(256, 256, bias=False)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def step(model, batch, accumulation=1, **_):
    print(f"RE-RUN batch={batch} accumulation={accumulation}")
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    for _ in range(accumulation):
        model(torch.ones(batch // accumulation, 256)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@pytest.mark.gpumem(budget="1 MiB")
def test_train(gpumem):
    model = Net()
    gpumem.register(model=model, step=lambda **knobs: step(model, **knobs), batch=1024)
    step(model, 1024)
"""


def test_the_advisors_re_runs_happen_in_the_call_phase_under_capture(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_train=TRAIN)
    result = pytester.runpytest("--gpumem-json=out.json", "-rA")
    result.assert_outcomes(failed=1)
    out = result.stdout.str()
    # The test's own step and the advisor's re-runs (batch 512 with accumulation 2) print into the call's
    # captured output, shown with the failure; none of it reaches the progress line.
    captured = out[out.index("Captured stdout call") :]
    assert "RE-RUN batch=1024 accumulation=1" in captured
    assert "RE-RUN batch=1024 accumulation=2" in captured or "RE-RUN batch=512" in captured
    progress = [line for line in result.outlines if line.startswith("test_train.py")]
    assert progress and all("RE-RUN" not in line for line in progress)
    test = json.loads((pytester.path / "out.json").read_text())["tests"][0]
    assert test["status"] == "over_budget"
    lever = next(lever for lever in test["advice"]["levers"] if lever["key"] == "batch")
    assert lever["source"] == "measured"


def test_results_travel_as_report_attributes_not_user_properties(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        """
seen = []

def pytest_runtest_logreport(report):
    if report.when == "call":
        seen.append((report.user_properties, type(getattr(report, "gpumem", None)).__name__))

def pytest_terminal_summary(terminalreporter):
    terminalreporter.write_line(f"SEEN {seen}")
"""
    )
    pytester.makepyfile(
        test_small="""
import pytest
import torch

@pytest.mark.gpumem
def test_small():
    torch.ones(1024)
"""
    )
    result = pytester.runpytest("--junitxml=out.xml")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["SEEN [([], 'dict')]"])
    xml = ET.parse(pytester.path / "out.xml")
    assert not list(xml.iter("property")), "JUnit XML carries no gpumem property"


def test_results_cross_xdist_on_the_report(pytester: pytest.Pytester) -> None:
    pytest.importorskip("xdist")
    pytester.makepyfile(
        test_small="""
import pytest
import torch

@pytest.mark.gpumem
@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_small(n):
    torch.ones(n * 1024)
"""
    )
    result = pytester.runpytest("-n", "2", "--gpumem-json=out.json")
    result.assert_outcomes(passed=4)
    tests = json.loads((pytester.path / "out.json").read_text())["tests"]
    peaks = {t["nodeid"]: t["sample"]["phases"]["call"]["allocated"]["cpu"] for t in tests}
    assert peaks == {f"test_small.py::test_small[{n}]": n * 4096 for n in (1, 2, 3, 4)}


def test_a_hung_re_run_is_stopped_by_pytest_timeouts_call_timer(pytester: pytest.Pytester) -> None:
    """The advisor's re-runs are part of the call, so pytest-timeout's timer of the call alone
    (``timeout_func_only``) stops one that hangs."""
    pytest.importorskip("pytest_timeout")
    pytester.makepyfile(
        test_train=TRAIN.replace(
            'print(f"RE-RUN', 'import time; time.sleep(600 if batch < 1024 or accumulation > 1 else 0); print(f"RE-RUN'
        )
    )
    result = pytester.runpytest("--timeout=5", "-o", "timeout_func_only=true")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*Timeout*"])
    assert result.duration < 120
