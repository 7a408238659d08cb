"""Whether the plugin's cost per test stays flat as a suite grows: thousands of trivial measured tests.

A suite of ``--tests`` tests (a 64x64 matrix product each) is generated in a
temporary directory and run with the plugin (``--gpumem-all``: every test is
measured, its leak checked and its result kept) and without it
(``-p no:gpumem``), one fresh process per run. The sides alternate, and the
side that goes first alternates from round to round, so that other work on a
shared machine falls on both alike. A small plugin in the generated suite
stamps the wall clock and the process's CPU time when each test's report is
done: a test's time is the gap since the previous test's stamp, so it holds
everything pytest and the plugin do for it. Every run uses one torch thread
(a thread pool that spins while it waits for a core would blur the times).

The table gives each run's total time (process start, imports and collection
included) and the mean time per test of the first and of the last ``--window``
tests, with their ratio: 1.0 where the cost of a test does not depend on how
many ran before it.

    python benchmarks/many_tests.py --out benchmarks/results/many-tests-cpu.md   # 5,000 tests, 3 rounds
    python benchmarks/many_tests.py --backend cuda --out benchmarks/results/many-tests-cuda.md
    python benchmarks/many_tests.py --smoke     # CI: 200 tests, one round, a temporary --out
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest_subprocess
from results_file import aligned_table, apply_smoke, check_written, publish

TITLE = "Many trivial tests: the cost of a test as the suite grows"
SMOKE = {"tests": 200, "repeat": 1, "window": 40}
SUITE = """
import pytest, torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.mark.parametrize("i", range({tests}))
def test_small(i):
    x = torch.ones(64, 64, device=DEVICE)
    (x @ x).relu_().sum().item()
"""
# The stamps go to preallocated lists of floats: two objects for the collector, however many tests run.
STAMPS = """
import json, os, time

WALL = [0.0] * ({tests} + 1)
CPU = [0.0] * ({tests} + 1)
DONE = [0]

def pytest_runtest_logstart(nodeid, location):
    if DONE[0] == 0:
        WALL[0], CPU[0] = time.perf_counter(), time.process_time()

def pytest_runtest_logfinish(nodeid, location):
    DONE[0] += 1
    WALL[DONE[0]], CPU[DONE[0]] = time.perf_counter(), time.process_time()

def pytest_sessionfinish(session):
    with open(os.environ["MANY_TESTS_STAMPS"], "w") as out:
        json.dump({{"wall": WALL[: DONE[0] + 1], "cpu": CPU[: DONE[0] + 1]}}, out)
"""
SIDES = ("without the plugin", "with the plugin")
CLOCKS = {"wall": "wall", "cpu": "CPU"}


@dataclass
class Run:
    side: str
    total: dict[str, float]  # clock: seconds, the whole process
    per_test: dict[str, list[float]]  # clock: seconds of each test, in the order run

    def mean_ms(self, clock: str, part: slice) -> float:
        return statistics.fmean(self.per_test[clock][part]) * 1000


def run(side: str, suite: Path, tests: int, backend: str) -> Run:
    """One run of the suite in a fresh process."""
    stamps = suite / "stamps.json"
    stamps.unlink(missing_ok=True)
    plugin = side == "with the plugin"
    args = ["--gpumem-all", f"--gpumem-backend={backend}"] if plugin else ["-p", "no:gpumem"]
    command = pytest_subprocess.command("-q", "-p", "no:cacheprovider", *args, "test_many.py", plugin=plugin)
    env = pytest_subprocess.environment(MANY_TESTS_STAMPS=str(stamps), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=suite, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0 or not stamps.exists():
        sys.exit(f"{side}: the run failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    times = json.loads(stamps.read_text())
    per_test = {clock: [b - a for a, b in itertools.pairwise(times[clock])] for clock in CLOCKS}
    if len(per_test["wall"]) != tests:
        sys.exit(f"{side}: {len(per_test['wall'])} tests ran, expected {tests}")
    return Run(side, {"wall": wall, "cpu": cpu}, per_test)


def report(runs: list[Run], tests: int, window: int, options: argparse.Namespace) -> str:
    first, last = slice(0, window), slice(tests - window, tests)
    head = ["round", "side", "total (s)", "total CPU (s)"]
    for name in CLOCKS.values():
        head += [f"{name}: first {window} (ms/test)", f"{name}: last {window} (ms/test)", f"{name}: last / first"]
    rows = [head]
    for i, r in enumerate(runs):
        cells = [str(i // len(SIDES) + 1), r.side, f"{r.total['wall']:.1f}", f"{r.total['cpu']:.1f}"]
        for clock in CLOCKS:
            a, b = r.mean_ms(clock, first), r.mean_ms(clock, last)
            cells += [f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"]
        rows.append(cells)

    by_side = {side: [r for r in runs if r.side == side] for side in SIDES}
    fastest = {side: min(rs, key=lambda r: r.total["wall"]) for side, rs in by_side.items()}
    plain, measured = fastest["without the plugin"], fastest["with the plugin"]
    summary = [["", "without the plugin", "with the plugin", "with / without"]]
    for clock, name in CLOCKS.items():
        a, b = plain.total[clock], measured.total[clock]
        summary.append([f"whole run, {name} (s)", f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"])
    for clock, name in CLOCKS.items():
        for label, part in ((f"first {window}", first), (f"last {window}", last)):
            a, b = plain.mean_ms(clock, part), measured.mean_ms(clock, part)
            summary.append([f"{label}, {name} (ms/test)", f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"])

    spreads = []
    for side, rs in by_side.items():
        if len(rs) > 1:
            for clock, name in CLOCKS.items():
                ratios = [r.mean_ms(clock, last) / r.mean_ms(clock, first) for r in rs]
                spreads.append(f"{side}, {name} last / first {min(ratios):.2f} to {max(ratios):.2f}")
    lines = [
        f"{tests} tests of a 64x64 matrix product each, backend {options.backend}, one torch thread; "
        f"{options.repeat} round(s), each running both sides once in a fresh process, the side that goes "
        "first alternating from round to round.",
        "",
        *aligned_table(rows),
        "",
        "The fastest run of each side (by wall time):",
        "",
        *aligned_table(summary),
        "",
        "A test's time is the gap between the ends of two consecutive tests' reports: what pytest and the "
        "plugin do for it (setup, call, teardown, the garbage collections around it, the verdict, the report). "
        "The totals also hold the process start, imports and collection. CPU is the pytest process's own CPU "
        "time, which other work on a shared machine changes far less than the wall time.",
    ]
    if spreads:
        lines += ["", "Spread over the rounds: " + "; ".join(spreads) + "."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=5000, help="tests in the suite (default: 5000)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default: 3)")
    parser.add_argument("--window", type=int, default=1000, help="tests in the first and the last window")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: 200 tests, one round, a temporary --out")
    options = parser.parse_args()
    apply_smoke(parser, options, SMOKE, "many-tests.md")
    tests, window = options.tests, options.window
    if window < 1 or tests < 2 * window:
        parser.error(f"--tests {tests} needs at least twice --window {window}")
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp)
        (suite / "test_many.py").write_text(SUITE.format(tests=tests))
        (suite / "conftest.py").write_text(STAMPS.format(tests=tests))
        for round_ in range(options.repeat):
            done = {}
            for side in SIDES[round_ % 2 :] + SIDES[: round_ % 2]:
                done[side] = run(side, suite, tests, options.backend)
                print(f"round {round_ + 1}, {side}: {done[side].total['wall']:.1f} s", file=sys.stderr)
            runs += [done[side] for side in SIDES]  # listed in the same order every round
    publish(report(runs, tests, window, options), options.out, TITLE)
    if options.smoke:
        check_written(options.out, TITLE)


if __name__ == "__main__":
    main()
