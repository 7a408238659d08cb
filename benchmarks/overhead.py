"""What measuring costs: wall time of the same suites with the plugin and with ``-p no:gpumem``.

Three suites:
  * ``examples``: the bundled example suite (tiny QLoRA steps on the CPU; real shapes on a GPU);
  * ``mlp``: small real training tests (a 256-1024-256 MLP, five AdamW steps on a batch of 64 each),
    where the cost per operator shows;
  * ``small``: many small measured tests (a few tensor operations each), where a
    per-test cost shows most.
Three sides, each a fresh process per run: without the plugin; without it but
with the ``gc.freeze()`` the plugin does before the first measured test (which
makes the interpreter's own collections cheaper for the rest of the run), so
that measuring itself is isolated; with the plugin. A round runs each side
once, in an order that rotates from round to round, so that a machine shared
with other work slows every side alike. Three tables, one per clock: the CPU
time of the pytest process (which other work on a shared machine changes
little), the CPU time of its tests after the first (``loop_clock``: without the
start-up, the collection and torch's one-time warm-up, which every side pays
alike) and the wall time.
Each gives every side's fastest and slowest run, the ratios of the fastest
runs with their range over the rounds, and the cost per test.

    python benchmarks/overhead.py --backend cpu --out benchmarks/results/overhead-cpu.md
    python benchmarks/overhead.py --backend cuda --suites small --out benchmarks/results/overhead-cuda.md
    python benchmarks/overhead.py --smoke     # CI: 2 mlp and 10 small tests, one round, a temporary --out
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest_subprocess
from loop_clock import CLOCK_ENV
from results_file import aligned_table, apply_smoke, check_written, publish

ROOT = Path(__file__).resolve().parent.parent
TITLE = "Overhead of measuring: the same suites with the plugin and without it"
SMOKE = {"backend": "cpu", "suites": "mlp,small", "mlp_tests": 2, "small_tests": 10, "repeat": 1, "threads": 1}
SMALL_SUITE = """
import pytest, torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.mark.gpumem
@pytest.mark.parametrize("i", range({tests}))
def test_small(i):
    x = torch.ones(64, 64, device=DEVICE)
    (x @ x).relu_().sum().item()
"""
MLP_SUITE = """
import pytest, torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.mark.gpumem
@pytest.mark.parametrize("i", range({tests}))
def test_mlp_adamw(i):
    torch.manual_seed(i)
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256)).to(DEVICE)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(5):
        x = torch.randn(64, 256, device=DEVICE)
        torch.nn.functional.mse_loss(model(x), x).backward()
        optimizer.step()
        optimizer.zero_grad()
"""
SIDES = ("without", "frozen", "with")
CLOCKS = {
    "cpu": "CPU time of the pytest process (user and system, all its threads): what measuring costs in work, "
    "which other work on a shared machine changes little",
    "loop": "CPU time of the tests after the first (their setup, call and teardown; no start-up, imports, "
    "collection, nor the first test's one-time warm-up of torch, which every side pays alike): what measuring "
    "costs per test",
    "wall": "Wall time: what a user waits",
}


def run(args: list[str], cwd: Path, plugin: bool, freeze: bool, threads: int | None) -> dict[str, float]:
    """One pytest run in a fresh process: its wall time, its CPU time (user and system, threads
    included), which other work on a shared machine changes far less, and the CPU time of its tests after
    the first."""
    clock = Path(tempfile.mkdtemp(prefix="gpumem-clock-")) / "loop.json"
    extra = {"GPUMEM_STUB_FREEZE": str(int(freeze)), CLOCK_ENV: str(clock)}
    if threads is not None:  # torch's intra-op threads: fewer threads spin less while they wait for a core
        extra.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env = pytest_subprocess.environment(**extra)
    command = pytest_subprocess.command("-q", "-p", "loop_clock", *args, plugin=plugin)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    loop = json.loads(clock.read_text(encoding="utf-8"))["cpu"]
    shutil.rmtree(clock.parent)
    return {"wall": wall, "cpu": after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, "loop": loop}


def spread(values: list[float], digits: int) -> str:
    """The smallest and the largest, or the one value."""
    low, high = min(values), max(values)
    return f"{low:.{digits}f}" if len(values) == 1 else f"{low:.{digits}f} to {high:.{digits}f}"


def measure(target: list[str], cwd: Path, options: argparse.Namespace, name: str) -> dict[str, list[dict[str, float]]]:
    """Every side's runs, ``repeat`` rounds of one run each, in an order that rotates from round to round."""
    plain = ["-p", "no:gpumem", "-p", "stub_gpumem", *target]
    commands = {  # side: its arguments, whether the plugin is loaded, whether the stand-in freezes
        "without": (plain, False, False),
        "frozen": (plain, False, True),
        "with": ([f"--gpumem-backend={options.backend}", *target], True, False),
    }
    runs: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for round_ in range(options.repeat):
        for side in SIDES[round_ % 3 :] + SIDES[: round_ % 3]:
            args, plugin, freeze = commands[side]
            runs[side].append(run(args, cwd, plugin, freeze, options.threads))
        print(
            f"{name}, round {round_ + 1}: "
            + ", ".join(
                f"{side} {runs[side][-1]['wall']:.2f} s wall, {runs[side][-1]['cpu']:.2f} s cpu, "
                f"{runs[side][-1]['loop']:.2f} s loop"
                for side in SIDES
            ),
            file=sys.stderr,
        )
    return runs


def row(name: str, tests: int, runs: dict[str, list[dict[str, float]]], clock: str) -> list[str]:
    """A suite's row for one clock: each side's fastest to slowest run; the ratios and the cost per test of
    the fastest runs, and in brackets their range over the rounds (each round's sides against each other)."""
    times = {side: [r[clock] for r in runs[side]] for side in SIDES}
    counted = max(1, tests - 1) if clock == "loop" else tests  # the loop clock starts after the first test
    with_, without, frozen = (min(times[side]) for side in ("with", "without", "frozen"))
    by_round = list(zip(times["with"], times["without"], times["frozen"], strict=True))
    several = len(by_round) > 1
    ratios = [w / o for w, o, _ in by_round]
    frozen_ratios = [w / f for w, _, f in by_round]
    costs = [(w - f) / counted * 1000 for w, _, f in by_round]
    return [
        name,
        str(tests),
        spread(times["without"], 2),
        spread(times["frozen"], 2),
        spread(times["with"], 2),
        f"{with_ / without:.3f}" + (f" ({spread(ratios, 3)})" if several else ""),
        f"{with_ / frozen:.3f}" + (f" ({spread(frozen_ratios, 3)})" if several else ""),
        f"{(with_ - frozen) / counted * 1000:.2f}" + (f" ({spread(costs, 2)})" if several else ""),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default: 5)")
    parser.add_argument("--suites", default="examples,mlp,small")
    parser.add_argument("--mlp-tests", type=int, default=40, help="tests in the mlp suite (default: 40)")
    parser.add_argument("--small-tests", type=int, default=200, help="tests in the small suite (default: 200)")
    parser.add_argument(
        "--threads", type=int, help="torch threads in every run (OMP_NUM_THREADS; default: torch's own choice)"
    )
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: 2 mlp and 10 small tests on the cpu, one round")
    options = parser.parse_args()
    apply_smoke(parser, options, SMOKE, "overhead.md")
    columns = [
        "suite",
        "tests",
        "without (s)",
        "without, gc frozen (s)",
        "with plugin (s)",
        "ratio",
        "ratio to frozen",
        "cost per test vs frozen (ms)",
    ]
    suites: dict[str, tuple[int, dict[str, list[dict[str, float]]]]] = {}
    if "examples" in options.suites.split(","):
        listed = subprocess.run(
            pytest_subprocess.command("--collect-only", "-q", "examples"),
            cwd=ROOT,
            env=pytest_subprocess.environment(),
            capture_output=True,
            text=True,
        ).stdout
        count = sum("::" in line for line in listed.splitlines())
        suites["examples"] = count, measure(["examples"], ROOT, options, "examples")
    if "mlp" in options.suites.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "test_mlp.py").write_text(MLP_SUITE.format(tests=options.mlp_tests))
            suites["mlp"] = options.mlp_tests, measure(["test_mlp.py"], Path(tmp), options, "mlp")
    if "small" in options.suites.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "test_small.py").write_text(SMALL_SUITE.format(tests=options.small_tests))
            runs = measure(["test_small.py"], Path(tmp), options, "small")
            suites["small"] = options.small_tests, runs
    lines = [
        f"Backend {options.backend}; "
        + (f"torch threads {options.threads} (OMP_NUM_THREADS); " if options.threads else "")
        + f"{options.repeat} round(s), each running every side once in a fresh "
        "process, in an order that rotates from round to round. Times: the fastest to the slowest run. Ratios "
        "and cost: of the fastest runs, and in brackets their range over the rounds (each round's sides against "
        "each other).",
        "",
    ]
    for clock, what in CLOCKS.items():
        lines += [f"{what}:", ""]
        lines += aligned_table([columns] + [row(name, tests, runs, clock) for name, (tests, runs) in suites.items()])
        lines.append("")
    lines += [
        "`examples` is the bundled example suite (`python -m pytest examples`: tiny model loads, LoRA and two "
        "AdamW steps each); `mlp` is measured tests that train a 256-1024-256 MLP for five AdamW steps on a batch "
        'of 64; `small` is measured tests of a 64x64 matrix product each. "ratio" compares with '
        "`-p no:gpumem`, whose side runs `benchmarks/stub_gpumem.py`: the model fixtures and a `gpumem` fixture "
        'that measures nothing. "ratio to frozen" compares with that side freezing the garbage collector as '
        "the plugin does before its first measured test, and so isolates what measuring costs.",
    ]
    publish("\n".join(lines), options.out, TITLE)
    if options.smoke:
        check_written(options.out, TITLE)


if __name__ == "__main__":
    main()
