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


def run_examples(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "examples", "--gpumem-backend=cpu", f"--gpumem-json={out}", *args],
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
    assert "gpumem" in done.stdout and "8 ok" in done.stdout


def test_example_suite_under_two_workers(tmp_path):
    done, tests = run_examples(tmp_path, "-n", "2")
    assert done.returncode == 0, done.stdout[-4000:]
    assert {t["verdict"]["status"] for t in tests.values()} == {"ok"}
