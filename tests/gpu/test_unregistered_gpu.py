"""A user's own tests on a real GPU, nothing registered: a 1B QLoRA loop over its budget, the same with
checkpointing in eval mode, and an 8B bf16 forward at batch 16 under a 16 GiB device limit
(``benchmarks/own_tests``). Each gets the right findings and levers with numbers; how close those numbers
are to each lever run for real is ``benchmarks/unregistered.py``'s table."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent.parent
GIB = 2**30

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: a 1B and an 8B model")


@pytest.fixture(scope="module")
def advised(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    work = tmp_path_factory.mktemp("own")
    out = work / "report.json"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/own_tests", "-k", "as_is", "-p", "no:cacheprovider",
         f"--gpumem-json={out}", f"--gpumem-baselines={work / 'baselines'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=540,
    )  # fmt: skip
    assert out.exists(), done.stdout[-4000:] + done.stderr[-4000:]
    print(done.stdout[-8000:])
    return {t["nodeid"].split("::test_")[-1]: t for t in json.loads(out.read_text())["tests"]}


def levers(test: dict) -> dict[str, dict]:
    return {lever["key"]: lever for lever in test["advice"]["levers"] if lever["key"] != "fix"}


def test_a_users_own_qlora_loop_gets_replayed_levers(advised: dict[str, dict]) -> None:
    test = advised["qlora__as_is"]
    assert test["verdict"]["status"] == "over_budget"
    advice = test["advice"]
    found = levers(test)
    for key in ("batch", "checkpointing", "seq", "optimizer"):
        assert found[key]["source"] == "replayed", found[key]
    # Checkpointing frees most of the activations; a smaller batch with accumulation covers the need too,
    # at a lower cost to quality, so it is recommended.
    assert found["checkpointing"]["saving"] > found["batch"]["saving"] > advice["needed"] > 0
    assert advice["recommended"] == ["batch"], advice
    # Fewer target modules frees far more than a lower rank (their inputs kept for the adapters go).
    assert found["targets"]["saving"] > 5 * found["rank"]["saving"] > 0
    assert "replayed this model on fake tensors" in advice["replay"], advice["replay"]
    assert "differ by more than" not in advice["replay"], advice["replay"]
    assert "no lever found" not in json.dumps(advice)


def test_checkpointing_in_eval_mode_is_found_and_fixed_first(advised: dict[str, dict]) -> None:
    advice = advised["qlora_eval__as_is"]["advice"]
    assert any("eval mode" in finding for finding in advice["findings"]), advice["findings"]
    fix = next(lever for lever in advice["levers"] if "model.train()" in lever["action"])
    assert fix["saving"] > advice["needed"] > 0
    assert advice["recommended"] == ["fix"], advice


def test_an_8b_forward_over_its_limit_is_told_what_it_needs(advised: dict[str, dict]) -> None:
    test = advised["forward8b__as_is"]
    assert test["verdict"]["status"] == "oom"
    advice = test["advice"]
    # What the whole forward needs past the limit, run again without it: gigabytes, not the failed request.
    assert advice["needed"] > 4 * GIB and test["verdict"]["oom"]["overshoot"] == advice["needed"]
    assert any("autograd on (batch 16 x seq 512)" in finding for finding in advice["findings"]), advice
    fix = next(lever for lever in advice["levers"] if "inference_mode" in lever["action"])
    found = levers(test)
    assert fix["saving"] > 0.5 * advice["needed"]
    assert 8 * GIB < found["weights4"]["saving"] < 12 * GIB  # 15 GiB of bf16 decoder weights -> ~4 GiB of nf4
    assert found["weights8"]["saving"] < found["weights4"]["saving"]
    assert found["spread"]["saving"] == 0  # one GPU visible: nothing to spread over
    assert "fix" in advice["recommended"] and advice["frees"] >= advice["needed"]
    assert not {"checkpointing", "lora", "qlora", "optimizer"} & set(found)
