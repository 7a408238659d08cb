"""End to end: the bundled example suite measures real QLoRA training and matches its stored baselines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(
    torch.cuda.is_available(), reason="compares with the cpu baselines; tests/gpu covers a machine with a GPU"
)


def run_examples(
    tmp_path: Path, *args: str, targets: tuple[str, ...] = ("examples",)
) -> tuple[subprocess.CompletedProcess[str], dict]:
    tmp_path.mkdir(exist_ok=True)
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", *targets, "--gpumem-backend=cpu", f"--gpumem-json={out}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    return done, {t["nodeid"]: t for t in json.loads(out.read_text())["tests"]}


def test_example_suite_matches_its_baselines_to_the_byte(tmp_path):
    done, tests = run_examples(tmp_path)
    assert done.returncode == 0, done.stdout[-4000:]
    stored = json.loads((ROOT / "baselines" / "cpu.json").read_text())["tests"]
    example_baselines = {k: v for k, v in stored.items() if k.startswith("examples/")}
    assert set(tests) == set(example_baselines)
    for nodeid, test in tests.items():
        assert test["verdict"]["status"] == "ok", (nodeid, test["verdict"])
        assert test["sample"]["phases"]["call"] == example_baselines[nodeid]["metrics"], nodeid
        assert test["sample"]["phases"]["call"]["allocated"]["cpu"] > 2**20  # real models, not empty tests
        assert {"load", "step1", "step2"} <= set(test["sample"]["phases"])
    assert f"{len(tests)} ok" in done.stdout
    # the GPU-only test's skip is named with its reason, without -rs
    assert "SKIPPED [1] examples/test_finetune_memory.py" in done.stdout and "needs a GPU" in done.stdout


def test_example_suite_repeats_in_reverse_order_and_under_two_workers(tmp_path):
    """Two more runs of the suite: reversed, and split over two fresh processes that make their own
    checkpoints; neither may find a regression or an improvement."""
    stored = json.loads((ROOT / "baselines" / "cpu.json").read_text())["tests"]
    nodeids = sorted((k for k in stored if k.startswith("examples/")), reverse=True)
    runs = {
        "reversed": run_examples(tmp_path / "reversed", targets=tuple(nodeids)),
        "workers": run_examples(tmp_path / "workers", "-n", "2", "-p", "no:cacheprovider"),
    }
    for name, (done, tests) in runs.items():
        assert done.returncode == 0, done.stdout[-4000:]
        assert set(tests) == set(nodeids), name
        assert {t["verdict"]["status"] for t in tests.values()} == {"ok"}, name
