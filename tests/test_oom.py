"""Out of memory as a result, on the cpu backend: the meter's device limit, the oom verdict in every report, a
clean state after an out-of-memory test (proved against a run without it), leaks, and the fit search.

Pure functions are tested with tables; the plugin through pytester, with real tensors of known size and
real (small) models.
"""

from __future__ import annotations

import fnmatch
import gc
import json
import pickle

import pytest
import torch

from pytest_gpumem.core import units
from pytest_gpumem.core.sample import Fit, Leak, OutOfMemory, TestResult
from pytest_gpumem.core.units import BadValue, Tolerance, format_bytes
from pytest_gpumem.measure.meters import base, oom_observer
from pytest_gpumem.measure.meters.tracker import DeviceLimitError, StorageTracker, TrackerMeter, resident
from pytest_gpumem.oom import capture
from pytest_gpumem.oom.fit import search
from pytest_gpumem.oom.leak import check_leak

KiB, MiB, GiB = 2**10, 2**20, 2**30


# -- the pieces


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "CUDA out of memory. Tried to allocate 20.00 MiB. GPU 0 has a total capacity of 79.19 GiB of which "
            "3.06 MiB is free. Including non-PyTorch memory, this process has 79.18 GiB memory in use. Of the "
            "allocated memory 78.52 GiB is allocated by PyTorch, and 142.23 MiB is reserved by PyTorch but "
            "unallocated. If reserved but unallocated memory is large try setting "
            "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True to avoid fragmentation.",
            {"requested": 20 * MiB, "device": 0, "free": round(3.06 * MiB), "allowed": None},
        ),
        (
            "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 1 has a total capacity of 79.19 GiB of which "
            "61.02 GiB is free. Including non-PyTorch memory, this process has 17.60 GiB memory in use. "
            "16.00 GiB allowed; Of the allocated memory 15.10 GiB is allocated by PyTorch, and 20.00 MiB is "
            "reserved by PyTorch but unallocated.",
            {"requested": 2 * GiB, "device": 1, "free": round(61.02 * GiB), "allowed": 16 * GiB},
        ),
        (
            "Out of memory. Tried to allocate 512 bytes. GPU 0 has a total capacity of 15.99 GiB of which "
            "0 bytes is free.",
            {"requested": 512, "device": 0, "free": 0, "allowed": None},
        ),
        ("CUDA out of memory. Tried to allocate 2.00 MiB (GPU 0; 15.78 GiB total capacity)", {"requested": 2 * MiB}),
        ("something else entirely", {"requested": None, "device": None, "free": None, "allowed": None}),
    ],
    ids=["torch-2.x", "with-fraction", "bytes", "old-format", "not-oom"],
)
def test_cuda_messages_give_their_numbers(message, expected):
    parsed = oom_observer.parse_cuda_message(message)
    assert {key: parsed[key] for key in expected} == expected


def test_out_of_memory_is_found_through_the_chain():
    error = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB.")
    try:
        try:
            raise error
        except torch.OutOfMemoryError as inner:
            raise RuntimeError("training failed") from inner
    except RuntimeError as outer:
        assert capture.find(outer) is error
    assert capture.find(ValueError("no")) is None
    assert capture.find(RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")) is not None


@pytest.mark.parametrize(
    ("fits_up_to", "start", "floor", "start_fails", "value", "runs"),
    [
        (100, 64, 1, False, 64, [64]),  # the start fits: one run
        (37, 64, 1, False, 37, [64, 32, 48, 40, 36, 38, 37]),  # halve to 32, bisect 32..64
        (37, 64, 1, True, 37, [32, 48, 40, 36, 38, 37]),  # the test's own value is not run again
        (0, 8, 1, False, None, [8, 4, 2, 1]),  # nothing fits down to the floor
        (0, 8, 3, False, None, [8, 4, 3]),  # nor above a floor
        (5, 8, 6, False, None, [8, 6]),
        (1, 1, 1, True, None, []),  # the start is the floor and it failed: nothing to try
        (1, 2, 1, True, 1, [1]),
    ],
)
def test_search_halves_then_bisects(fits_up_to, start, floor, start_fails, value, runs):
    fit = search(lambda v: 1000 * v if v <= fits_up_to else None, "batch", start, floor, start_fails=start_fails)
    assert fit.value == value
    assert fit.peak == (1000 * value if value is not None else None)
    assert [v for v, _ in fit.tried] == runs
    assert all((peak is not None) == (v <= fits_up_to) for v, peak in fit.tried)


@pytest.mark.parametrize(
    ("devices", "policy", "peak", "expected"),
    [
        ({}, None, 0, Leak(0, {}, MiB, enforced=False)),
        ({"cpu": 2 * MiB}, None, 0, Leak(2 * MiB, {"cpu": 2 * MiB}, MiB, enforced=False)),
        ({"cpu": 2 * MiB}, Tolerance(floor=4 * MiB), 0, Leak(2 * MiB, {"cpu": 2 * MiB}, 4 * MiB, enforced=True)),
        ({"cuda:0": 3, "cuda:1": 9}, Tolerance(percent=10), 100, Leak(9, {"cuda:0": 3, "cuda:1": 9}, 10, True)),
        ({"cpu": 2 * MiB}, False, 0, None),
    ],
)
def test_check_leak(devices, policy, peak, expected):
    leak = check_leak(devices, policy, peak, Tolerance(floor=MiB))
    assert leak == expected
    if leak is not None:
        assert leak.flagged == (leak.bytes > leak.allowed)
        assert leak.failed == (leak.enforced and leak.flagged)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1 MiB", Tolerance(floor=MiB)), ("1%, 2 KiB", Tolerance(1.0, 2 * KiB)), (False, False), ("off", False)],
)
def test_parse_leak(value, expected):
    assert units.parse_leak(value, "here") == expected


@pytest.mark.parametrize(
    ("parse", "value", "message"),
    [
        (
            units.parse_leak,
            True,
            "here: expected a tolerance such as '1 MiB' or '1%, 1 MiB', or False for no check; got True",
        ),
        (units.parse_leak, "lots", "here: 'lots' is not a tolerance*"),
        (units.parse_device_limit, "16 gigs", "here: '16 gigs' is not a size*"),
        (units.parse_device_limit, 0, "here: a device limit must be more than 0 bytes, got 0"),
        (units.parse_device_limit, -1, "here: a size cannot be negative, got -1"),
    ],
)
def test_bad_values_name_their_source(parse, value, message):
    with pytest.raises(BadValue) as excinfo:
        parse(value, "here")
    assert fnmatch.fnmatchcase(str(excinfo.value), message)


def test_the_meters_error_is_cudas_and_pickles():
    error = DeviceLimitError("cpu", MiB, {"cpu": 3 * MiB}, 4 * MiB, 7, ("call", "forward", None))
    assert isinstance(error, torch.cuda.OutOfMemoryError)
    assert "Tried to allocate 1.00 MiB" in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (again.device, again.requested, again.allocated, again.limit) == ("cpu", MiB, {"cpu": 3 * MiB}, 4 * MiB)


def test_results_with_oom_leak_and_fits_round_trip():
    from pytest_gpumem.core.sample import Sample, Verdict

    failure = OutOfMemory("cuda:0", 2 * MiB, {"cuda:0": 10 * MiB}, {"cuda:0": 12 * MiB}, 13 * MiB, MiB, "CUDA oom")
    result = TestResult(
        "t.py::t",
        "cpu",
        Sample("cpu"),
        Verdict("oom", "allocated", 5, oom=failure),
        passed=False,
        leak=Leak(3, {"cpu": 3}, 1, True),
        fits=[Fit("batch", 8, 1, 5, 100, 13 * MiB, [(4, 90), (6, None), (5, 100)])],
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert data["verdict"]["oom"]["needed"] == MiB
    assert TestResult.from_dict(data).to_dict() == result.to_dict()
    plain = TestResult("t.py::t", "cpu", Sample("cpu"), Verdict("ok", "allocated", 5), passed=True)
    assert "oom" not in plain.to_dict()["verdict"]


# -- the cpu meter's limit, on tensors of known size


def test_an_allocation_over_the_limit_raises_and_is_never_counted():
    tracker = StorageTracker(attribute=True)
    tracker.limit = MiB
    with tracker:
        kept = torch.empty(512 * KiB, dtype=torch.uint8)
        with pytest.raises(torch.cuda.OutOfMemoryError) as excinfo:
            torch.empty(600 * KiB, dtype=torch.uint8)
        alive = tracker.current["cpu"]
    error = excinfo.value
    assert isinstance(error, DeviceLimitError)
    assert (error.device, error.requested, error.allocated, error.limit) == ("cpu", 600 * KiB, {"cpu": 512 * KiB}, MiB)
    assert alive == 512 * KiB and tracker.peak["cpu"] == 512 * KiB  # the refused one was never counted
    assert tracker.last_oom is not None and tracker.last_oom[0] == error.seq
    del kept


def test_what_earlier_tests_left_alive_counts_against_the_limit():
    first = TrackerMeter(attribute=False)
    first.begin()
    left = torch.empty(3 * MiB, dtype=torch.uint8)
    first.end()
    assert resident().get("cpu") == 3 * MiB
    assert first.leftover() == {"cpu": 3 * MiB}

    second = TrackerMeter(attribute=False)
    second.set_limit(4 * MiB)
    second.begin()
    with pytest.raises(DeviceLimitError) as excinfo:
        torch.empty(2 * MiB, dtype=torch.uint8)  # 3 + 2 > 4: the leftover counts
    second.end()
    assert excinfo.value.allocated == {"cpu": 3 * MiB}

    del left, excinfo
    gc.collect()
    assert first.leftover() == {}
    assert "cpu" not in resident()
    second.begin()
    fine = torch.empty(2 * MiB, dtype=torch.uint8)  # fits once the leftover is freed
    second.end()
    second.set_limit(None)
    del fine


def test_every_meter_here_can_guard():
    assert base.guard(TrackerMeter()) is not None
    assert base.guard(object()) is None


# -- the plugin: the oom verdict in every report

TRAIN = """
import pytest, torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256, bias=False) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x

def step(model, batch, accumulation=1, **_):
    model.zero_grad(set_to_none=True)
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    for _ in range(accumulation):
        model(torch.ones(batch * {rows} // accumulation, 256)).sum().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
"""


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest("--gpumem-json=out.json", *args)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"]: t for t in doc["tests"]}


def test_out_of_memory_is_a_memory_failure_with_its_numbers_and_levers(pytester):
    pytester.makepyfile(
        test_train=TRAIN.format(rows=1)
        + """
@pytest.mark.gpumem(device_limit="3 MiB")
def test_train(gpumem):
    model = Net()  # 2 x 256 KiB of weights
    gpumem.register(model=model, step=lambda **knobs: step(model, **knobs), batch=1024)
    step(model, 1024)  # the input (1 MiB) and the first layer's output (1 MiB) fit; its relu does not

@pytest.mark.gpumem
def test_train_unlimited():
    step(Net(), 1024)  # what the whole step takes
"""
    )
    result, tests = run(pytester, "--gpumem-markdown=out.md")
    result.assert_outcomes(failed=1, passed=1)
    whole = tests["test_train.py::test_train_unlimited"]["sample"]["phases"]["call"]["allocated"]["cpu"]
    over = whole - 3 * MiB
    result.stdout.fnmatch_lines(
        [
            "gpumem: out of memory (allocated peak, cpu backend, hardware cpu)",
            "  request   1.00 MiB (1048576 B) on cpu",
            "  device    cpu: 2.50 MiB allocated; limit 3.00 MiB; 512.00 KiB free",
            "  short     the request needed 512.00 KiB more than was free under the limit of 3.00 MiB",
            f"  over      the whole step needs {format_bytes(over)} more than the limit (run again without it)",
            "  peak      2.50 MiB (2621440 B)",
            "  at        call, forward (Net) on cpu",
            "  lever     smaller batch + accumulation: * (measured)",
            f"  advice    smaller batch + accumulation: frees * of the {format_bytes(over)} needed (enough)",
        ]
    )
    result.stdout.fnmatch_lines(["*out of memory at call, forward (Net) on cpu", "1 out of memory, 1 new"])
    result.stdout.fnmatch_lines(["MEMORY test_train.py::test_train - *"])  # its own status: a memory failure

    test = tests["test_train.py::test_train"]
    assert test["status"] == "oom" and test["passed"] is False
    failure = test["verdict"]["oom"]
    assert failure["requested"] == MiB
    assert failure["allocated"] == failure["reserved"] == {"cpu": 512 * KiB + 2 * MiB}
    assert (failure["limit"], failure["free"], failure["needed"]) == (3 * MiB, 512 * KiB, 512 * KiB)
    assert failure["overshoot"] == over > failure["needed"]  # the step needs more after the failed request
    at = failure["attribution"]
    assert (at["peak"]["weights"], at["peak"]["activations"], at["stage"]) == (512 * KiB, 2 * MiB, "forward")
    lever = next(lever for lever in test["advice"]["levers"] if lever["key"] == "batch")
    assert lever["source"] == "measured" and lever["saving"] >= over
    assert test["advice"]["recommended"] == ["batch"] and test["advice"]["needed"] == over

    markdown = (pytester.path / "out.md").read_text()
    assert markdown.startswith("### gpumem: 1 out of memory")
    assert "| `test_train.py::test_train` | allocated | 2.50 MiB | - | - | - | **oom** |" in markdown
    assert "out of memory at call, forward (Net) on cpu</summary>" in markdown
    assert "- request: 1.00 MiB (1048576 B) on cpu" in markdown
    assert "- short: the request needed 512.00 KiB more than was free under the limit of 3.00 MiB" in markdown
    assert "**smaller batch + accumulation: frees" in markdown and "needed (enough)**" in markdown


def test_a_fixture_that_runs_out_of_memory_is_reported_too(pytester):
    pytester.makepyfile(
        test_setup="""
        import pytest, torch

        @pytest.fixture
        def big():
            return torch.ones(4 * 2**20, dtype=torch.uint8)

        @pytest.mark.gpumem(device_limit="2 MiB")
        def test_uses_big(big):
            pass
        """
    )
    result, tests = run(pytester)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["gpumem: out of memory*", "  request   4.00 MiB (4194304 B) on cpu"])
    assert tests["test_setup.py::test_uses_big"]["verdict"]["oom"]["requested"] == 4 * MiB


# -- a clean state after an out-of-memory test

PROOF = """
import pytest, torch

MiB = 2**20
KEEP = []

@pytest.mark.gpumem
def test_a_runs_out_of_memory():
    kept = torch.ones(6 * MiB, dtype=torch.uint8)
    {stash}
    more = torch.ones(6 * MiB, dtype=torch.uint8)  # 12 MiB: over the 10 MiB limit

@pytest.mark.gpumem
def test_b_fits_only_in_a_clean_state():
    x = torch.ones(8 * MiB, dtype=torch.uint8)  # 6 MiB left behind + 8 MiB would not fit
    del x
    y = torch.ones(MiB, dtype=torch.uint8)

@pytest.mark.gpumem
def test_c_trains(gpumem):
    model = Net()
    for i in (1, 2):
        with gpumem.phase(f"step{{i}}"):
            step(model, 64)

def test_d_cleans_up():
    KEEP.clear()  # what test_a may have kept goes now, not with the module (which gc.freeze() may keep)
"""


def test_an_out_of_memory_test_changes_nothing_for_the_tests_after_it(pytester):
    pytester.makepyfile(test_suite=TRAIN.format(rows=1) + PROOF.format(stash=""))
    alone, without = run(pytester, "--gpumem-device-limit=10MiB", "-k", "not test_a")
    alone.assert_outcomes(passed=3)
    result, tests = run(pytester, "--gpumem-device-limit=10MiB")
    result.assert_outcomes(passed=3, failed=1)
    assert tests["test_suite.py::test_a_runs_out_of_memory"]["status"] == "oom"
    assert tests["test_suite.py::test_a_runs_out_of_memory"]["leak"]["bytes"] == 0  # its frames were freed
    for name in ("test_b_fits_only_in_a_clean_state", "test_c_trains"):
        after, before = tests[f"test_suite.py::{name}"], without[f"test_suite.py::{name}"]
        assert after["sample"] == before["sample"]  # every phase's peak, before, attribution: to the byte
        assert after["verdict"] == before["verdict"]
        assert after["leak"] == before["leak"]
        assert after["passed"]
    assert tests["test_suite.py::test_b_fits_only_in_a_clean_state"]["sample"]["phases"]["call"]["allocated"] == {
        "cpu": 8 * MiB
    }


def test_what_an_out_of_memory_test_leaves_behind_is_flagged_and_counts_after_it(pytester):
    # The same suite, but the failing test keeps its tensor in a module global: the later test
    # runs out of memory, as it would on a GPU, and the leak is named.
    pytester.makepyfile(test_suite=TRAIN.format(rows=1) + PROOF.format(stash="KEEP.append(kept)"))
    result, tests = run(pytester, "--gpumem-device-limit=10MiB")
    result.assert_outcomes(passed=2, failed=2)
    assert tests["test_suite.py::test_a_runs_out_of_memory"]["leak"]["bytes"] == 6 * MiB
    b = tests["test_suite.py::test_b_fits_only_in_a_clean_state"]
    assert b["status"] == "oom" and b["verdict"]["oom"]["allocated"] == {"cpu": 6 * MiB}
    result.stdout.fnmatch_lines(
        ["*leak: test_suite.py::test_a_runs_out_of_memory left 6.00 MiB alive after its teardown (cpu 6.00 MiB)*"]
    )
    gc.collect()
    assert "cpu" not in resident()  # gone when the suite dropped it


# -- leaks

LEAKY = """
import pytest, torch

STASH = []

@pytest.mark.gpumem{marker}
def test_leaky():
    STASH.append(torch.ones(2 * 2**20, dtype=torch.uint8))  # kept alive by the module

@pytest.mark.gpumem{marker}
def test_clean():
    x = torch.ones(2 * 2**20, dtype=torch.uint8)

@pytest.fixture
def model():
    return torch.nn.Linear(1024, 1024)  # 4 MiB, freed with the fixture

@pytest.mark.gpumem{marker}
def test_fixture_memory_is_not_a_leak(model):
    model(torch.ones(1, 1024))
"""


def test_a_leak_is_flagged_without_failing_by_default(pytester):
    pytester.makepyfile(test_leak=LEAKY.format(marker=""))
    result, tests = run(pytester, "--gpumem-markdown=out.md")
    result.assert_outcomes(passed=3)
    assert tests["test_leak.py::test_leaky"]["leak"] == {
        "bytes": 2 * MiB,
        "devices": {"cpu": 2 * MiB},
        "allowed": MiB,
        "enforced": False,
    }
    assert tests["test_leak.py::test_clean"]["leak"]["bytes"] == 0
    assert tests["test_leak.py::test_fixture_memory_is_not_a_leak"]["leak"]["bytes"] == 0
    result.stdout.fnmatch_lines(
        [
            "*warnings summary*",
            "test_leak.py::test_leaky",
            "*GpuMemWarning: gpumem: leak: the test left 2.00 MiB alive after its teardown (cpu 2.00 MiB); "
            "flagged above 1.00 MiB",
        ]
    )
    assert result.stdout.str().count("gpumem: leak:") == 1
    result.stdout.fnmatch_lines(["leak: test_leak.py::test_leaky left 2.00 MiB alive after its teardown*"])
    assert "- leak: `test_leak.py::test_leaky`" not in (pytester.path / "out.md").read_text()
    assert "- leak: test_leak.py::test_leaky left 2.00 MiB" in (pytester.path / "out.md").read_text()


@pytest.mark.parametrize(
    ("marker", "args"), [('(leak="1 MiB")', ()), ("", ("--gpumem-leak=1MiB",))], ids=["marker", "option"]
)
def test_a_leak_over_a_set_limit_errors_the_test(pytester, marker, args):
    pytester.makepyfile(test_leak=LEAKY.format(marker=marker))
    result, tests = run(pytester, *args)
    result.assert_outcomes(passed=3, errors=1)
    result.stdout.fnmatch_lines(
        [
            "*ERROR at teardown of test_leaky*",
            "gpumem: leak: the test left 2.00 MiB alive after its teardown (cpu 2.00 MiB); its limit is 1.00 MiB",
        ]
    )
    assert tests["test_leak.py::test_leaky"]["leak"]["enforced"] is True
    assert "GpuMemWarning" not in result.stdout.str()


def test_leak_checks_can_be_turned_off(pytester):
    pytester.makepyfile(test_leak=LEAKY.format(marker="(leak=False)"))
    result, tests = run(pytester, "--gpumem-leak=1MiB")
    result.assert_outcomes(passed=3)
    assert tests["test_leak.py::test_leaky"]["leak"] is None
    pytester.makepyfile(test_leak=LEAKY.format(marker=""))
    result, tests = run(pytester, "--gpumem-leak=off")
    result.assert_outcomes(passed=3)
    assert all(test["leak"] is None for test in tests.values())


# -- the fit search

BATCHES = range(1, 25)
SEARCH = """
@pytest.mark.gpumem
@pytest.mark.parametrize("batch", {batches})
def test_peak(batch):
    step(Net(), batch)

@pytest.mark.gpumem(retry_on_oom="batch")
def test_retry(gpumem):
    model = Net()
    gpumem.register(model=model, step=lambda **knobs: step(model, **knobs), batch={start})
    step(model, {start})

@pytest.mark.gpumem
def test_max_fit(gpumem):
    model = Net()

    def trial(batch):
        with gpumem.phase("trial"):  # a phase inside a run: the run's peak spans it
            step(model, batch)
        torch.ones(1)

    fit = gpumem.max_fit(trial, start={start})
    assert fit.value is not None
"""


def test_the_search_finds_the_largest_batch_that_fits_under_a_limit(pytester):
    pytester.makepyfile(test_fit=TRAIN.format(rows=64) + SEARCH.format(batches=list(BATCHES), start=max(BATCHES)))
    # Each batch's peak, measured on its own without a limit.
    result, tests = run(pytester, "-k", "test_peak")
    result.assert_outcomes(passed=len(BATCHES))
    peaks = {b: tests[f"test_fit.py::test_peak[{b}]"]["sample"]["phases"]["call"]["allocated"]["cpu"] for b in BATCHES}
    limit = (peaks[15] + peaks[16]) // 2
    expected = max(b for b in BATCHES if peaks[b] <= limit)
    assert 1 < expected < max(BATCHES)

    result, tests = run(pytester, "-k", "not test_peak", f"--gpumem-device-limit={limit}")
    result.assert_outcomes(passed=1, failed=1)  # the retry still fails: it ran with a batch that does not fit
    retry = tests["test_fit.py::test_retry"]
    assert retry["status"] == "oom"
    [fit] = retry["fits"]
    assert (fit["knob"], fit["start"], fit["value"], fit["peak"], fit["limit"]) == (
        "batch",
        max(BATCHES),
        expected,
        peaks[expected],
        limit,
    )
    assert fit["purpose"] is False and max(BATCHES) not in [v for v, _ in fit["tried"]]
    assert all(peak == peaks[v] if peak is not None else peaks[v] > limit for v, peak in fit["tried"])
    result.stdout.fnmatch_lines(
        [
            f"  retry     batch {max(BATCHES)} ran out of memory under *; the largest batch that fits is {expected} "
            f"(peak *), found by re-running the step; tried *; the test ran with batch {max(BATCHES)} and fails"
        ]
    )

    [fit] = tests["test_fit.py::test_max_fit"]["fits"]
    assert (fit["value"], fit["peak"], fit["purpose"]) == (expected, peaks[expected], True)
    assert tests["test_fit.py::test_max_fit"]["status"] == "new"
    result.stdout.fnmatch_lines([f"fit: test_fit.py::test_max_fit: the largest batch that fits under * is {expected}*"])


def test_a_retry_without_a_registered_step_says_why(pytester):
    pytester.makepyfile(
        test_retry="""
        import pytest, torch

        @pytest.mark.gpumem(device_limit="1 MiB", retry_on_oom="seq")
        def test_no_step():
            torch.ones(2 * 2**20, dtype=torch.uint8)
        """
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    [fit] = tests["test_retry.py::test_no_step"]["fits"]
    assert fit["value"] is None and "registered no seq" in fit["note"]
    result.stdout.fnmatch_lines(["  retry     seq: no search: the test registered no seq to scale*"])


# -- a real QLoRA step that fits at one limit and not at a smaller one


def test_a_qlora_step_fits_at_one_limit_and_names_the_lever_at_a_smaller_one(pytester):
    pytest.importorskip("transformers")
    pytester.makepyfile(
        test_qlora="""
        import pytest

        @pytest.mark.parametrize(
            "limit", [pytest.param(v, marks=pytest.mark.gpumem(device_limit=v)) for v in ("8 MiB", "4 MiB")]
        )
        def test_step(limit, quantized_model, lora, train_step):
            model = lora(quantized_model("llama", size="tiny"), r=8, gradient_checkpointing=False)
            train_step(model, batch=2, seq=64, steps=2)
        """
    )
    result, tests = run(pytester)
    result.assert_outcomes(passed=1, failed=1)
    fits, fails = tests["test_qlora.py::test_step[8 MiB]"], tests["test_qlora.py::test_step[4 MiB]"]
    assert fits["status"] == "new" and fits["sample"]["phases"]["call"]["allocated"]["cpu"] > 4 * MiB
    assert fails["status"] == "oom"
    failure, advice = fails["verdict"]["oom"], fails["advice"]
    assert failure["overshoot"] == fits["sample"]["phases"]["call"]["allocated"]["cpu"] - 4 * MiB
    needed = max(failure["needed"], failure["overshoot"])
    assert advice["needed"] == needed > 0
    chosen = [lever for lever in advice["levers"] if lever["key"] in advice["recommended"]]
    assert chosen and all(lever["source"] == "measured" for lever in chosen)
    assert sum(lever["saving"] for lever in chosen) >= needed
    result.stdout.fnmatch_lines(["  lever     *(measured)", "  advice    *needed (enough)"])


# -- bad values


MEASURED = """
import pytest, torch

@pytest.mark.{marker}
def test_step():
    torch.empty(1024)
"""


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('gpumem(device_limit="16 gigs")', "*test_step: device_limit: '16 gigs' is not a size*"),
        ("gpumem(device_limit=0)", "*test_step: device_limit: a device limit must be more than 0 bytes, got 0"),
        ("gpumem(leak=True)", "*test_step: leak: expected a tolerance such as '1 MiB' or '1%, 1 MiB', or False*"),
        ('gpumem(leak="some")', "*test_step: leak: 'some' is not a tolerance*"),
        ('gpumem(retry_on_oom="bs")', "*test_step: retry_on_oom: unknown knob 'bs'; choose one of batch, seq"),
        (
            'gpumem(None, None, "allocated", "16 GiB")',
            "*test_step: 4 positional arguments*at most 3 (budget, tolerance, metric)*",
        ),
    ],
)
def test_bad_marker_values_error_that_test_in_one_line(pytester, marker, message):
    pytester.makepyfile(test_mem=MEASURED.format(marker=marker))
    result = pytester.runpytest()
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message.replace("*test_step", "gpumem marker of test_mem.py::test_step")])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.parametrize(
    ("args", "ini", "env", "message"),
    [
        (["--gpumem-device-limit=lots"], "", {}, "ERROR: --gpumem-device-limit: 'lots' is not a size*"),
        ([], "gpumem_device_limit = 0", {}, "ERROR: ini option gpumem_device_limit: a device limit must be more*"),
        ([], "gpumem_leak = maybe", {}, "ERROR: ini option gpumem_leak: 'maybe' is not a tolerance*"),
        ([], "", {"GPUMEM_LEAK": "-1%"}, "ERROR: environment variable GPUMEM_LEAK: '-1%' is not a tolerance*"),
    ],
)
def test_bad_options_stop_the_run_naming_the_source(pytester, monkeypatch, args, ini, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_mem=MEASURED.format(marker="gpumem"))
    result = pytester.runpytest(*args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_the_marker_help_lists_the_new_arguments(pytester):
    result = pytester.runpytest("--markers")
    result.stdout.fnmatch_lines(["*gpumem(budget*, [*], device_limit*, leak*, retry_on_oom*)*device_limit: run*"])
