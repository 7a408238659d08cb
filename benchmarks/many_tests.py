"""Whether the plugin's cost per test stays flat as a suite grows: thousands of trivial measured tests.

A suite of ``--tests`` tests (one small tensor operation each) is generated in a
temporary directory and run with the plugin (``--gpumem-all``, so every test is
measured, its leak checked and its result kept) and without it (``-p no:gpumem``),
one process per run. Runs alternate (without, with, without, with, ...), so
that whatever else loads the machine falls on both sides alike. A small plugin
in the generated suite stamps ``time.perf_counter()`` when each test's report is
done; a test's time is the gap since the previous one's, everything that pytest
and the plugin do for it included. The table gives each run's total wall time
(process start, imports and collection included), the mean time per test of
the first and of the last ``--window`` tests, and their ratio: 1.0 when the cost
per test does not grow with the number of tests already run.

    python benchmarks/many_tests.py                      # 5,000 tests, once each side
    python benchmarks/many_tests.py --smoke              # 200 tests: checks the script runs (CI)
    python benchmarks/many_tests.py --tests 5000 --repeat 3 --out benchmarks/results/many-tests-cpu.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from results_file import header, write

ROOT = Path(__file__).resolve().parent.parent

SUITE = """
import pytest, torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.mark.parametrize("i", range({tests}))
def test_small(i):
    x = torch.ones(64, 64, device=DEVICE)
    (x @ x).relu_().sum().item()
"""

# Stamps kept in a preallocated list of floats: one object for the collector, however many tests run.
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


@dataclass
class Run:
    side: str
    total: float  # seconds, the whole process
    wall: list[float]  # seconds, each test in the order run
    cpu: list[float]  # seconds of the process's CPU time, each test

    def mean_ms(self, part: slice, clock: str = "wall") -> float:
        return statistics.fmean((self.wall if clock == "wall" else self.cpu)[part]) * 1000


def run(side: str, args: list[str], suite: Path, tests: int) -> Run:
    stamps = suite / "stamps.json"
    stamps.unlink(missing_ok=True)
    # One thread for torch's operators: a thread pool spinning on a shared machine blurs the times.
    env = dict(os.environ, PYTHONPATH=str(ROOT), MANY_TESTS_STAMPS=str(stamps), OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args, "test_many.py"]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=suite, env=env, capture_output=True, text=True)
    total = time.perf_counter() - start
    if done.returncode != 0 or not stamps.exists():
        sys.exit(f"{side}: the run failed: {' '.join(command)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    times = json.loads(stamps.read_text())
    wall, cpu = ([b - a for a, b in itertools.pairwise(t)] for t in (times["wall"], times["cpu"]))
    if len(wall) != tests:
        sys.exit(f"{side}: {len(wall)} tests ran, expected {tests}")
    return Run(side, total, wall, cpu)


def table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, row in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tests", type=int, default=5000, help="tests in the suite (default 5000)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each side, alternating (default 1)")
    parser.add_argument("--window", type=int, help="tests in the first and last window (default: 1000, or a fifth)")
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--smoke", action="store_true", help="200 tests, once each side: checks the script runs")
    parser.add_argument("--out", type=Path, help="also write the whole results file here")
    options = parser.parse_args()
    tests = 200 if options.smoke else options.tests
    repeat = 1 if options.smoke else options.repeat
    window = options.window or min(1000, tests // 5)
    if tests < 2 * window or window < 1:
        parser.error(f"--tests {tests}: needs at least twice --window ({window}) tests")
    sides = {
        "without the plugin": ["-p", "no:gpumem"],
        "with the plugin": ["--gpumem-all", f"--gpumem-backend={options.backend}"],
    }
    load = os.getloadavg()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        suite = Path(tmp)
        (suite / "test_many.py").write_text(SUITE.format(tests=tests))
        (suite / "conftest.py").write_text(STAMPS.format(tests=tests))
        for _ in range(repeat):
            for side, args in sides.items():
                runs.append(run(side, args, suite, tests))
                print(f"{side}: {runs[-1].total:.1f} s", file=sys.stderr)
    load_after = os.getloadavg()

    first, last = slice(0, window), slice(tests - window, tests)
    rows = [
        [
            "run",
            "side",
            "total (s)",
            f"first {window} (ms/test)",
            f"last {window} (ms/test)",
            "last / first",
            f"CPU, first {window} (ms/test)",
            f"CPU, last {window} (ms/test)",
            "CPU last / first",
        ]
    ]
    for i, r in enumerate(runs):
        row = [str(i // len(sides) + 1), r.side, f"{r.total:.1f}"]
        for clock in ("wall", "cpu"):
            a, b = r.mean_ms(first, clock), r.mean_ms(last, clock)
            row += [f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"]
        rows.append(row)
    by_side = {side: [r for r in runs if r.side == side] for side in sides}
    fastest = {side: min(rs, key=lambda r: r.total) for side, rs in by_side.items()}
    plain, measured = fastest["without the plugin"], fastest["with the plugin"]
    summary = [["", "without the plugin", "with the plugin", "with / without"]]
    parts = [
        ("whole run (s)", None, "wall"),
        (f"first {window} (ms/test)", first, "wall"),
        (f"last {window} (ms/test)", last, "wall"),
        (f"CPU, first {window} (ms/test)", first, "cpu"),
        (f"CPU, last {window} (ms/test)", last, "cpu"),
    ]
    for label, part, clock in parts:
        a = plain.total if part is None else plain.mean_ms(part, clock)
        b = measured.total if part is None else measured.mean_ms(part, clock)
        summary.append([label, f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}"])
    spread = {side: (min(r.total for r in rs), max(r.total for r in rs)) for side, rs in by_side.items() if len(rs) > 1}

    lines = [
        f"{tests} trivial tests (a 64x64 matrix product each), backend {options.backend}; "
        f"{repeat} run(s) of each side, alternating, one process per run.",
        "",
        *table(rows),
        "",
        f"The fastest run of each side{' (one run each)' if repeat == 1 else ''}:",
        "",
        *table(summary),
        "",
        f"Load average (1 min) before the runs {load[0]:.2f}, after {load_after[0]:.2f}, "
        f"on {os.cpu_count()} cores: other work on the machine shares them, which is why the runs alternate"
        + (
            "; the spread between runs of a side: "
            + ", ".join(f"{side} {lo:.1f}-{hi:.1f} s" for side, (lo, hi) in spread.items())
            if spread
            else ""
        )
        + ".",
        "A test's time is the gap between the ends of two consecutive tests' reports, so it holds everything pytest "
        "and the plugin do for the test (setup, call, teardown, the leak check's garbage collection, the verdict, "
        "the report); the totals also hold the process start, imports and collection. The CPU columns count the "
        "process's own CPU time (time.process_time), which other work on the machine disturbs less than the wall "
        "clock.",
    ]
    print("\n".join(lines))
    if options.out:
        write(options.out, header("Many trivial tests: the cost per test as the suite grows") + "\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
