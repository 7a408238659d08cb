"""The model fixtures through pytest: quantized_model, lora, train_step, and the gpumem phases they open."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

SUITE = """
import pytest, torch
from pytest_gpumem.models.training import GpuMemWarning

def test_qlora(quantized_model, lora, train_step, gpumem):
    with gpumem.phase("load"):
        model = lora(quantized_model("llama", size="tiny", quant="nf4"), r=4)
    model.eval()
    with pytest.warns(GpuMemWarning, match="eval mode"):
        train_step(model, batch=2, seq=32, steps=2)

def test_local_path(quantized_model, gpumem_model_dir):
    from pytest_gpumem.models.loading import make_checkpoint
    path = make_checkpoint(gpumem_model_dir, "qwen2", "tiny")
    assert quantized_model(path=path, quant="bf16").config.model_type == "qwen2"

def test_ini_path(quantized_model):
    assert quantized_model(quant="fp32").config.model_type == "mistral"

@pytest.mark.parametrize("kwargs, message", [
    (dict(arch="gpt2"), "unknown architecture 'gpt2'; choose one of llama, mistral, qwen2"),
    (dict(arch="llama", size="13b"), "unknown size '13b' for llama; choose one of tiny, 1b, 3b, 8b"),
    (dict(arch="llama", quant="nf3"), "unknown quant 'nf3'; choose one of nf4, fp4, int8, bf16, fp16, fp32"),
    (dict(arch="llama", compute_dtype="half"), "unknown compute_dtype 'half'; choose one of bfloat16"),
    (dict(path="nowhere"), "'nowhere' is not a checkpoint directory"),
])
def test_bad_arguments(quantized_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        quantized_model(**kwargs)
"""


@pytest.fixture(scope="module")
def mistral(tmp_path_factory):
    from pytest_gpumem.models.loading import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("models"), "mistral", "tiny")


def test_fixtures_load_train_and_record_phases(mistral, pytester):
    pytester.makeini(f"[pytest]\ngpumem_model_path = {mistral}\n")
    pytester.makepyfile(test_models=SUITE)
    result = pytester.runpytest_subprocess("--gpumem-json=out.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=8)
    tests = {t["nodeid"]: t for t in json.loads((pytester.path / "out.json").read_text())["tests"]}
    phases = tests["test_models.py::test_qlora"]["sample"]["phases"]
    assert set(phases) == {"setup", "call", "load", "step1", "step2"}
    peaks = {name: values["allocated"]["cpu"] for name, values in phases.items()}
    assert peaks["call"] == max(peaks["load"], peaks["step1"], peaks["step2"]) > 0


def test_making_a_checkpoint_is_not_measured(pytester):
    """The first call makes the checkpoint inside the test; the peak equals a run where it already existed."""
    pytester.makepyfile(
        """
        def test_load(quantized_model, gpumem):
            quantized_model("llama", size="tiny", quant="nf4")
        """
    )
    cold = pytester.runpytest_subprocess("--gpumem-json=cold.json")  # pytest's cache is empty: makes it
    warm = pytester.runpytest_subprocess("--gpumem-json=warm.json")  # finds it in the cache
    cold.assert_outcomes(passed=1)
    warm.assert_outcomes(passed=1)

    def peak(name: str) -> int:
        test = json.loads((pytester.path / name).read_text())["tests"][0]
        return test["sample"]["phases"]["call"]["allocated"]["cpu"]

    assert peak("cold.json") == peak("warm.json") > 0
