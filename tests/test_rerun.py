"""The fast path: a test measured without the attribution, and run once more where there is something to
explain. The fast path is cuda's (``ON_DEMAND_BACKENDS``); asked for on the cpu backend here, so that the
mechanism runs without a GPU: a conftest adds cpu to those backends."""

from __future__ import annotations

import json

import pytest
from inner_run import run_by_name

pytest_plugins = ["pytester"]

FAST_ON_CPU = """
import pytest_gpumem.measured

DEFAULT = pytest_gpumem.measured.ON_DEMAND_BACKENDS


def pytest_configure(config):
    pytest_gpumem.measured.ON_DEMAND_BACKENDS = ("cuda", "cpu")


def pytest_unconfigure(config):
    pytest_gpumem.measured.ON_DEMAND_BACKENDS = DEFAULT
"""

TESTS = """
import pytest
import torch


def note_call(name):
    with open(name + ".calls", "a") as calls:
        calls.write("x")


@pytest.fixture
def model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))


def step(model, batch):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(batch, 256)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()


@pytest.mark.gpumem(budget="1 MiB")
def test_over_budget(model):
    note_call("over_budget")
    step(model, 64)


@pytest.mark.gpumem(budget="1 GiB")
def test_within_budget(model):
    note_call("within_budget")
    step(model, 64)


@pytest.mark.gpumem(device_limit="3 MiB")
def test_out_of_memory(model):
    note_call("out_of_memory")
    hidden = model(torch.randn(64, 256))
    wide = torch.ones(2**20)  # 4 MiB: more than the limit
    (hidden.sum() + wide.sum()).backward()


SECOND = []


@pytest.mark.gpumem(budget="1 MiB")
def test_grows_when_run_again(model):
    SECOND.append(True)
    held = torch.ones(2**18 * len(SECOND))  # 1 MiB, then 2 MiB
    step(model, 64)
    del held
"""


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    pytester.makeconftest(FAST_ON_CPU)
    pytester.makepyfile(test_steps=TESTS)
    return run_by_name(pytester, *args)


def calls(pytester: pytest.Pytester, name: str) -> int:
    path = pytester.path / f"{name}.calls"
    return len(path.read_text()) if path.exists() else 0


def test_a_failing_test_is_attributed_by_a_second_run_and_a_passing_one_is_not_run_again(
    pytester: pytest.Pytester,
) -> None:
    result, tests = run(pytester)
    result.assert_outcomes(passed=1, failed=3)

    failing = tests["test_over_budget"]
    assert calls(pytester, "over_budget") == 2
    assert failing["rerun"]["reproduced"] is True, failing["rerun"]
    assert (
        failing["rerun"]["peak"]
        == failing["rerun"]["measured"]
        == failing["sample"]["phases"]["call"]["allocated"]["cpu"]
    )
    peak = failing["sample"]["attribution"]["peak"]
    total = peak["weights"] + peak["gradients"] + peak["optimizer"] + peak["activations"]
    assert abs(total - failing["rerun"]["measured"]) <= 0.02 * failing["rerun"]["measured"]
    assert peak["weights"] > 0 and peak["optimizer"] > 0  # the fixture's model, made before the second run
    assert "repeated its peak to the byte" in result.stdout.str()

    passing = tests["test_within_budget"]
    assert calls(pytester, "within_budget") == 1
    assert passing["sample"]["attribution"] is None and "rerun" not in passing


def test_the_second_runs_attribution_is_the_one_measured_as_the_test_ran(pytester: pytest.Pytester) -> None:
    _, fast = run(pytester, "-k", "over_budget")
    (pytester.path / "over_budget.calls").unlink()
    _, always = run(pytester, "-k", "over_budget", "--gpumem-attribute=always")
    assert calls(pytester, "over_budget") == 1  # attributed as it ran: not run again
    assert "rerun" not in always["test_over_budget"]
    first, second = fast["test_over_budget"]["sample"], always["test_over_budget"]["sample"]
    assert first["phases"] == second["phases"]
    assert first["attribution"] == second["attribution"]  # its stages, and where the peak happened, too
    assert first["attribution"]["stage"] == "optimizer"


def test_a_second_run_that_does_not_repeat_the_peak_is_reported(pytester: pytest.Pytester) -> None:
    result, tests = run(pytester, "-k", "grows")
    result.assert_outcomes(failed=1)
    again = tests["test_grows_when_run_again"]["rerun"]
    assert again["reproduced"] is False and again["peak"] > again["measured"]
    out = result.stdout.str()
    assert "did not repeat its peak" in out and "so it describes that run" in out


def test_an_out_of_memory_failure_is_attributed_at_the_failure_of_the_second_run(pytester: pytest.Pytester) -> None:
    result, tests = run(pytester, "-k", "out_of_memory")
    result.assert_outcomes(failed=1)
    # Run again under the limit, for the attribution at its failure; once more without it, for what it needs.
    assert calls(pytester, "out_of_memory") == 3
    test = tests["test_out_of_memory"]
    assert test["advice"]["needed"] == test["verdict"]["oom"]["overshoot"] > 0
    again = test["rerun"]
    assert again["reproduced"] is True and again["error"].startswith("DeviceLimitError: Out of memory"), again
    oom = test["verdict"]["oom"]
    assert oom["requested"] == 4 * 2**20
    # What was alive when the 4 MiB request failed: the fixture's weights and the forward's activations.
    peak = oom["attribution"]["peak"]
    assert peak["weights"] == sum(4 * n for n in (256 * 512, 512, 512 * 256, 256))
    assert peak["activations"] > 0


OWN_STEP = """
import pytest
import torch


@pytest.mark.gpumem(budget="1 MiB")
def test_own_step(gpumem):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.ReLU(), torch.nn.Linear(512, 256))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step(batch=64):
        model(torch.randn(batch, 256)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()

    gpumem.register(model=model, optimizer=optimizer, step=step, batch=64)
    step()
"""


def test_a_step_registered_in_the_body_is_registered_again_by_the_second_run(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(FAST_ON_CPU)
    pytester.makepyfile(test_own=OWN_STEP)
    documents = {}
    for mode in ("auto", "always"):
        pytester.runpytest(f"--gpumem-json={mode}.json", "-p", "no:cacheprovider", f"--gpumem-attribute={mode}")
        documents[mode] = json.loads((pytester.path / f"{mode}.json").read_text())["tests"][0]
    fast, always = documents["auto"], documents["always"]
    # The first run's model, held by the step it registered, is not alive beside the second run's.
    assert fast["rerun"]["reproduced"] is True, fast["rerun"]
    assert fast["sample"]["attribution"] == always["sample"]["attribution"]
    levers = {lever["key"]: lever for lever in fast["advice"]["levers"]}
    assert levers["batch"]["source"] == "measured"  # the second run's step, run again by the what-ifs
    assert levers["batch"]["saving"] == {lv["key"]: lv for lv in always["advice"]["levers"]}["batch"]["saving"]
