"""CUDA's fast path on a real GPU: a passing QLoRA test runs without the attribution's tracker and once; a
failing one runs again with it, and its attribution is what ``--gpumem-attribute=always`` gives, its consumers
adding up to the allocator's peak."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
MODELS = ROOT / ".pytest_cache" / "d" / "gpumem-models"  # the example suite's checkpoints, made once

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the fast path is the cuda backend's"
)

TESTS = """
import os
from pathlib import Path

import pytest
from torch.utils._python_dispatch import _get_current_dispatch_mode

from pytest_gpumem.models import loading, training

SIZE, SEQ = os.environ["GPUMEM_TEST_SIZE"], int(os.environ["GPUMEM_TEST_SEQ"])


@pytest.fixture
def model(gpumem):
    path = loading.ensure_checkpoint(Path(os.environ["GPUMEM_TEST_MODELS"]), "llama", SIZE)
    with gpumem.phase("load"):
        model = loading.load(path, "nf4", True, "bfloat16", {"": 0})
        return loading.add_lora(model, r=16, gradient_checkpointing=True)


def step(name, model, gpumem):
    with open(name + ".calls", "a") as calls:  # T: a dispatch mode (the tracker) sees the step
        calls.write("T" if _get_current_dispatch_mode() is not None else "F")
    training.train_steps(model, batch=2, seq=SEQ, steps=2, phase=gpumem.phase)


@pytest.mark.gpumem(budget="1 MiB")
def test_over_budget(model, gpumem):
    step("over_budget", model, gpumem)


@pytest.mark.gpumem(budget="120 GiB")
def test_within_budget(model, gpumem):
    step("within_budget", model, gpumem)
"""


def run(directory: Path, size: str, seq: int, *args: str) -> dict:
    directory.mkdir()
    (directory / "test_qlora.py").write_text(TESTS)
    out = directory / "out.json"
    env = {
        **os.environ,
        "GPUMEM_TEST_SIZE": size,
        "GPUMEM_TEST_SEQ": str(seq),
        "GPUMEM_TEST_MODELS": str(MODELS),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    command = [sys.executable, "-m", "pytest", "--gpumem-backend=cuda", f"--gpumem-json={out}", "-pno:cacheprovider"]
    done = subprocess.run(
        [*command, *args, "test_qlora.py"],
        cwd=directory,
        env=env,
        capture_output=True,
        text=True,
        timeout=500,
    )
    assert out.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    return {t["nodeid"].split("::")[1]: t for t in json.loads(out.read_text())["tests"]}


def calls(directory: Path, name: str) -> str:
    return (directory / f"{name}.calls").read_text()


@pytest.mark.parametrize(("size", "seq"), [("tiny", 64), ("1b", 512)])
def test_a_failing_qlora_step_is_attributed_by_its_second_run(tmp_path, size, seq):
    fast = run(tmp_path / "fast", size, seq)
    always = run(tmp_path / "always", size, seq, "--gpumem-attribute=always")

    passing = fast["test_within_budget"]
    assert calls(tmp_path / "fast", "within_budget") == "F"  # once, and no tracker
    assert passing["sample"]["attribution"] is None and "rerun" not in passing

    failing = fast["test_over_budget"]
    assert calls(tmp_path / "fast", "over_budget") == "FT"  # measured without the tracker, explained with it
    peak = failing["sample"]["phases"]["call"]["allocated"]["cuda:0"]
    assert failing["rerun"]["reproduced"], failing["rerun"]
    attribution = failing["sample"]["attribution"]["peak"]
    consumers = ("weights", "gradients", "optimizer", "activations")
    total = sum(attribution[c] for c in consumers)
    print(f"{size}: allocator {peak}, attributed {total}: {attribution}")
    assert abs(total - peak) <= 0.02 * peak

    # The same test attributed as it ran: the same peaks (the fast path changes no measurement), and the same
    # consumers.
    assert calls(tmp_path / "always", "over_budget") == calls(tmp_path / "always", "within_budget") == "T"
    reference = always["test_over_budget"]
    for name in ("test_over_budget", "test_within_budget"):
        for phase, peaks in fast[name]["sample"]["phases"].items():
            assert peaks["allocated"] == always[name]["sample"]["phases"][phase]["allocated"], (name, phase)
    assert "rerun" not in reference
    expected = reference["sample"]["attribution"]["peak"]
    for consumer in consumers:
        assert abs(attribution[consumer] - expected[consumer]) <= 0.02 * peak, (consumer, attribution, expected)
    assert failing["sample"]["attribution"]["stage"] == reference["sample"]["attribution"]["stage"]
