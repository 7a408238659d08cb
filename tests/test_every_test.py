"""Advice for a user's own test: its own model, its own loop, nothing registered. The plugin finds the
model and the optimizer, says what is wrong, and gives each lever a number, replayed on fake tensors where
the step cannot be run again."""

from __future__ import annotations

import json

import pytest

pytest_plugins = ["pytester"]

MODEL = """
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, dtype="bfloat16")


def lora_model():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16)
    model.config.use_cache = False
    return get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
"""


REPLAY_ON_CPU = """
import pytest_gpumem.measured

ALWAYS = pytest_gpumem.measured.REPLAY_BACKENDS


def pytest_configure(config):  # the replay's numbers are a GPU's (see REPLAY_BACKENDS): asked for here
    pytest_gpumem.measured.REPLAY_BACKENDS = ("cuda", "cpu")


def pytest_unconfigure(config):
    pytest_gpumem.measured.REPLAY_BACKENDS = ALWAYS
"""


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest("--gpumem-json=out.json", "-p", "no:cacheprovider", *args)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"].split("::")[1]: t for t in doc["tests"]}


def test_a_users_own_lora_loop_gets_levers_with_numbers(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(REPLAY_ON_CPU)
    pytester.makepyfile(
        test_own=MODEL
        + """
@pytest.mark.gpumem(budget="1 MiB")
def test_own_loop():
    model = lora_model()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        ids = torch.randint(0, 256, (4, 64))
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    advice = tests["test_own_loop"]["advice"]
    levers = {lever["key"]: lever for lever in advice["levers"]}
    # Replayed: this model's config, its LoRA, batch 4 x seq 64 and AdamW, on fake tensors, lever by lever.
    for key in ("batch", "checkpointing", "seq"):
        assert levers[key]["source"] == "replayed", levers[key]
        assert levers[key]["saving"] > 0
        assert "replayed the model on fake tensors" in levers[key]["basis"]
    assert "batch 4 x seq 64" in advice["replay"] and "measured" in advice["replay"]
    assert advice["recommended"], advice
    result.stdout.fnmatch_lines(["  replay    replayed this model on fake tensors for the * (llama config, bf16, *"])
    assert "no lever found" not in result.stdout.str()


def test_an_inference_forward_with_autograd_on_is_found(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_own=MODEL
        + """
@pytest.mark.gpumem(budget="1 MiB")
def test_forward_only():
    model = lora_model().eval()
    model(input_ids=torch.randint(0, 256, (8, 64)))

@pytest.mark.gpumem(budget="1 MiB")
def test_forward_in_inference_mode():
    model = lora_model().eval()
    with torch.inference_mode():
        model(input_ids=torch.randint(0, 256, (8, 64)))
"""
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=2)
    found = tests["test_forward_only"]["advice"]
    assert any("1 forward pass with autograd on (batch 8 x seq 64)" in f for f in found["findings"]), found
    fix = next(lever for lever in found["levers"] if lever["key"] == "fix")
    assert "inference_mode" in fix["action"] and fix["saving"] > 0
    batch = next(lever for lever in found["levers"] if lever["key"] == "batch")
    assert batch["action"] == "batch 8 -> 4 (run the inputs in 2 smaller batches)" and batch["saving"] > 0
    clean = tests["test_forward_in_inference_mode"]["advice"]
    assert not any("autograd on" in f for f in clean["findings"])


def test_checkpointing_in_eval_mode_and_float32_weights_are_found(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_own=MODEL
        + """
@pytest.mark.gpumem(budget="1 MiB")
def test_eval_mode_checkpointing():
    model = lora_model()
    model.gradient_checkpointing_enable()
    model.eval()  # checkpointing recomputes nothing in eval mode
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 256, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()

@pytest.mark.gpumem(budget="1 MiB")
def test_float32_weights():
    model = lora_model().float()  # the config names bfloat16
    model.train()
    ids = torch.randint(0, 256, (2, 64))
    model(input_ids=ids, labels=ids).loss.backward()
"""
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=2)
    eval_mode = tests["test_eval_mode_checkpointing"]["advice"]["findings"]
    assert any("eval mode" in f and "model.train()" in f for f in eval_mode), eval_mode
    weights = tests["test_float32_weights"]["advice"]
    assert any("weights are float32" in f and "bfloat16" in f for f in weights["findings"]), weights
    fix = next(lever for lever in weights["levers"] if lever["key"] == "fix" and "dtype" in lever["action"])
    assert fix["saving"] > 0


def test_a_plain_module_gets_estimated_levers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_plain="""
import pytest
import torch

@pytest.mark.gpumem(budget="1 KiB")
def test_mlp():
    model = torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model(torch.ones(64, 256)).sum().backward()
    optimizer.step()
"""
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    advice = tests["test_mlp"]["advice"]
    assert advice["replay"] == ""  # not a transformers LoRA model: nothing replayed
    assert all(lever["source"] == "estimated" for lever in advice["levers"])


def test_fewer_targets_and_a_lower_rank_are_two_levers(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_own=MODEL.replace('target_modules=["q_proj", "v_proj"]', 'target_modules="all-linear"')
        + """
@pytest.mark.gpumem(budget="1 MiB")
def test_all_linear():
    model = lora_model()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 256, (4, 64))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
"""
    )
    result, tests = run(pytester, "--gpumem-explain=all")
    levers = {lever["key"]: lever for lever in tests["test_all_linear"]["advice"]["levers"]}
    assert levers["rank"]["action"] == "LoRA r 8 -> 4"
    assert levers["targets"]["action"].startswith("LoRA on q_proj, v_proj only, not 7 target modules")
    # Dropping five of seven adapters frees their inputs too: far more than halving the rank.
    assert levers["targets"]["saving"] > 2 * levers["rank"]["saving"] > 0
    result.stdout.fnmatch_lines(["*fewer LoRA target modules: LoRA on q_proj, v_proj only*"])


LOOP = """
def train(batch=4, seq=64, accumulation=1, checkpointing=False):
    model = lora_model()
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(2):
        for _ in range(accumulation):
            ids = torch.randint(0, 256, (batch, seq))
            model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

@pytest.mark.gpumem
def test_as_is():
    train()

@pytest.mark.gpumem
def test_smaller_batch():
    train(batch=2, accumulation=2)

@pytest.mark.gpumem
def test_checkpointing():
    train(checkpointing=True)

@pytest.mark.gpumem
def test_shorter_sequences():
    train(seq=32)
"""


def test_savings_match_the_variants_run_for_real(pytester: pytest.Pytester) -> None:
    """Each lever of a user's own loop (estimated, on the cpu backend) against the same loop run for real
    with that lever, under the plugin: within 20%."""
    pytester.makepyfile(test_own=MODEL + LOOP)
    result, tests = run(pytester, "--gpumem-explain=all")
    result.assert_outcomes(passed=4)

    def peak(name: str) -> int:
        return tests[name]["sample"]["phases"]["call"]["allocated"]["cpu"]

    levers = {lever["key"]: lever for lever in tests["test_as_is"]["advice"]["levers"]}
    real = {
        "batch": peak("test_as_is") - peak("test_smaller_batch"),
        "checkpointing": peak("test_as_is") - peak("test_checkpointing"),
        "seq": peak("test_as_is") - peak("test_shorter_sequences"),
    }
    for key, saved in real.items():
        assert levers[key]["source"] == "estimated"
        assert saved > 0 and abs(levers[key]["saving"] - saved) <= 0.2 * saved, (key, levers[key], saved)
