"""pytest-xdist with packing on the cpu backend: the scheduler admits by stored peaks, results equal a serial
run's, and a test that runs out of memory beside another is retried alone and says so."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xdist")

SUITE = """
import os, pathlib, time
import pytest, torch

RUNNING = pathlib.Path(os.environ["RUNNING_DIR"])

@pytest.fixture
def running(request):
    mark = RUNNING / request.node.name
    mark.touch()
    yield
    mark.unlink()

@pytest.mark.gpumem
@pytest.mark.parametrize("mib", [1, 2, 3, 4, 5, 6])
def test_alloc(mib, running):
    x = torch.empty(mib * 2**20, dtype=torch.uint8)
    time.sleep(0.6)

def others():
    return [p.name for p in RUNNING.iterdir() if p.name.startswith("test_") and p.name != "test_crowded"]


@pytest.mark.gpumem
def test_crowded(running):
    torch.empty(8 * 2**20, dtype=torch.uint8)  # the largest: scheduled first, while the others run
    first = not (RUNNING / "crowded-ran").exists()
    (RUNNING / "crowded-ran").touch()
    wait = first and os.environ.get("CROWDED_WAIT")
    for _ in range(100 if wait else 0):  # the first time, give the other worker's test time to start
        if others():
            break
        time.sleep(0.1)
    if others():  # as a GPU would, shared with a test that takes what this one needs
        raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 2.00 GiB (beside {others()})")

@pytest.mark.gpumem(exclusive=True)
def test_exclusive(running):
    beside = [p.name for p in RUNNING.iterdir() if p.name.startswith("test_") and p.name != "test_exclusive"]
    assert not beside, f"ran beside {beside}"
    time.sleep(0.2)
"""


QUIET = ("-p", "no:cacheprovider")


def peaks(path):
    return {test["nodeid"]: test["sample"]["phases"]["call"] for test in json.loads(path.read_text())["tests"]}


def test_packed_workers_measure_what_a_serial_run_measures(pytester, monkeypatch):
    pytester.makepyfile(test_packed_suite=SUITE)
    running = pytester.mkdir("running")
    monkeypatch.setenv("RUNNING_DIR", str(running))
    serial = pytester.runpytest_subprocess(
        "--gpumem-update-baselines", "--gpumem-json=serial.json", "-p", "no:cacheprovider"
    )
    serial.assert_outcomes(passed=8)
    (running / "crowded-ran").unlink()
    monkeypatch.setenv("CROWDED_WAIT", "1")

    packed = pytester.runpytest_subprocess(
        "-n",
        "2",
        "--gpumem-pack",
        "--gpumem-pack-capacity=1 GiB",
        "--gpumem-json=packed.json",
        "-p",
        "no:cacheprovider",
    )
    packed.stdout.fnmatch_lines(["*gpumem: 2 workers sharing the cpu, packed by stored peaks with a margin of 10%*"])
    assert packed.parseoutcomes() == {"passed": 8, "rerun": 1}, packed.stdout.str()
    packed.stdout.fnmatch_lines(["*retried alone*test_crowded*"])
    assert peaks(pytester.path / "packed.json") == peaks(pytester.path / "serial.json")


def test_a_retry_does_not_stop_a_run_under_exitfirst(pytester, monkeypatch):
    pytester.makepyfile(test_packed_suite=SUITE)
    running = pytester.mkdir("running")
    monkeypatch.setenv("RUNNING_DIR", str(running))
    pytester.runpytest_subprocess("--gpumem-update-baselines", *QUIET).assert_outcomes(passed=8)
    (running / "crowded-ran").unlink()
    monkeypatch.setenv("CROWDED_WAIT", "1")
    packed = pytester.runpytest_subprocess("-x", "-n", "2", "--gpumem-pack", "--gpumem-pack-capacity=1 GiB", *QUIET)
    assert packed.parseoutcomes() == {"passed": 8, "rerun": 1}, packed.stdout.str()


def test_a_device_too_small_for_two_runs_one_test_at_a_time(pytester, monkeypatch):
    pytester.makepyfile(test_packed_suite=SUITE)
    monkeypatch.setenv("RUNNING_DIR", str(pytester.mkdir("running")))
    pytester.runpytest_subprocess("--gpumem-update-baselines", "-p", "no:cacheprovider").assert_outcomes(passed=8)
    # 10 MiB less 10% holds test_crowded's 8 MiB alone, never beside another
    packed = pytester.runpytest_subprocess(
        "-n", "2", "--gpumem-pack", "--gpumem-pack-capacity=10 MiB", "-p", "no:cacheprovider"
    )
    assert packed.parseoutcomes() == {"passed": 8}, packed.stdout.str()


@pytest.mark.parametrize("args", [["-n", "2", "--gpumem-gpus-per-worker=1"], ["-n", "auto", "--gpumem-pack"]])
def test_pinning_needs_enough_gpus(pytester, args):
    pytester.makepyfile(test_one="def test_one(): pass")
    result = pytester.runpytest_subprocess(*args, "--gpumem-backend=cuda")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpumem-backend cuda: no CUDA device is visible*"])


def test_bad_gpu_counts_and_packing_without_workers_are_said(pytester):
    pytester.makepyfile(test_one="def test_one(): pass")
    bad = pytester.runpytest("--gpumem-gpus-per-worker=0")
    assert bad.ret == pytest.ExitCode.USAGE_ERROR
    bad.stderr.fnmatch_lines(["*--gpumem-gpus-per-worker: '0' is not a whole number of GPUs (1 or more)*"])
    alone = pytester.runpytest("--gpumem-pack")
    alone.assert_outcomes(passed=1)
    alone.stdout.fnmatch_lines(["gpumem: --gpumem-pack and --gpumem-gpus-per-worker act on pytest-xdist workers*"])
