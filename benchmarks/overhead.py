"""What measuring costs: wall time of the same suites with the plugin and with ``-p no:gpumem``.

Two suites:
  * ``examples``: the bundled example suite (tiny QLoRA steps on the CPU; real shapes on a GPU);
  * ``small``: many small measured tests (a few tensor operations each), where a
    per-test cost shows most.
Each is run ``--repeat`` times in a fresh process per run, alternating, and the
fastest run of each side is kept. The plugin calls ``gc.freeze()`` before the
first measured test, which makes the interpreter's own collections cheaper for
the rest of the run; a third side, without the plugin but with that freeze,
isolates what measuring itself costs. The table gives both ratios and the cost
per test.

    python benchmarks/overhead.py --backend cpu
    python benchmarks/overhead.py --backend cuda --suites small
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SMALL_TESTS = 200
SMALL_SUITE = f"""
import pytest, torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

@pytest.mark.gpumem
@pytest.mark.parametrize("i", range({SMALL_TESTS}))
def test_small(i):
    x = torch.ones(64, 64, device=DEVICE)
    (x @ x).relu_().sum().item()
"""


def run(args: list[str], cwd: Path, freeze: bool = False) -> float:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{ROOT / 'benchmarks'}", GPUMEM_STUB_FREEZE=str(int(freeze)))
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(args)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return elapsed


def measure(name: str, target: list[str], cwd: Path, backend: str, repeat: int, tests: int) -> list[str]:
    plain = ["-p", "no:gpumem", "-p", "stub_gpumem", *target]
    measured = [f"--gpumem-backend={backend}", *target]
    with_plugin, without, frozen = [], [], []
    for _ in range(repeat):
        without.append(run(plain, cwd))
        frozen.append(run(plain, cwd, freeze=True))
        with_plugin.append(run(measured, cwd))
    a, b, c = min(with_plugin), min(without), min(frozen)
    return [
        name,
        str(tests),
        f"{b:.2f}",
        f"{c:.2f}",
        f"{a:.2f}",
        f"{a / b:.3f}",
        f"{a / c:.3f}",
        f"{(a - c) / tests * 1000:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--suites", default="examples,small")
    options = parser.parse_args()
    rows = [
        [
            "suite",
            "tests",
            "without (s)",
            "without, gc frozen (s)",
            "with plugin (s)",
            "ratio",
            "ratio to frozen",
            "cost per test vs frozen (ms)",
        ]
    ]
    suites = options.suites.split(",")
    if "examples" in suites:
        listed = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "examples"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout
        count = sum("::" in line for line in listed.splitlines())
        rows.append(measure("examples", ["examples"], ROOT, options.backend, options.repeat, count))
    if "small" in suites:
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "test_small.py").write_text(SMALL_SUITE)
            rows.append(measure("small", ["test_small.py"], Path(tmp), options.backend, options.repeat, SMALL_TESTS))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"backend {options.backend}, fastest of {options.repeat} runs each, one process per run")
    for i, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
