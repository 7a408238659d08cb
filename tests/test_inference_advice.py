"""Advice for a user's own inference test: a forward pass, nothing registered. The advisor names what is
wrong (autograd on with no backward), gives the levers of inference with numbers (inference_mode, smaller
batches, 8-bit and 4-bit weights), and, where the test ran out of memory under a simulated device limit,
says what the whole test needs, by running it again without the limit."""

from __future__ import annotations

import json

import pytest
from inner_run import run_by_name

pytest_plugins = ["pytester"]

MODEL = """
import pytest
import torch
from transformers import BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

CONFIG = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, dtype="bfloat16")


def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**CONFIG)).to(torch.bfloat16).eval()


def forward(model, batch=8, seq=64):
    return model(input_ids=torch.randint(0, 256, (batch, seq))).logits.sum().item()
"""

TRAINING_LEVERS = {"checkpointing", "lora", "qlora", "rank", "targets", "optimizer"}


def test_an_inference_forward_over_its_device_limit_is_told_what_it_needs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(
        test_own=MODEL
        + """
@pytest.mark.gpumem(device_limit="20 MiB")
def test_over_the_limit():
    forward(model())

@pytest.mark.gpumem
def test_without_a_limit():
    forward(model())
"""
    )
    result, tests = run_by_name(pytester)
    result.assert_outcomes(failed=1, passed=1)
    failed = tests["test_over_the_limit"]
    assert failed["verdict"]["status"] == "oom"
    # The need is the whole forward's peak past the limit, not the one allocation that failed.
    unlimited = tests["test_without_a_limit"]["sample"]["phases"]["call"]["allocated"]["cpu"]
    advice = failed["advice"]
    assert advice["needed"] == unlimited - 20 * 2**20, (advice["needed"], unlimited)
    assert failed["verdict"]["oom"]["overshoot"] == advice["needed"]
    # The test's forward never finished under the limit; run again without it, it showed what it does.
    assert any("forward pass with autograd on (batch 8 x seq 64)" in f for f in advice["findings"]), advice
    keys = {lever["key"] for lever in advice["levers"]}
    assert {"fix", "batch", "seq", "weights8", "weights4"} <= keys and not keys & TRAINING_LEVERS, keys
    assert "spread" not in keys  # the cpu backend has no GPUs to spread the layers over
    assert advice["recommended"] and advice["frees"] >= advice["needed"], advice
    result.stdout.fnmatch_lines(
        [
            "  over      the whole step needs * more than the limit (run again without it)",
            "  advice    fix a setting*: frees * of the * needed (enough)",
        ]
    )


def test_inference_levers_match_the_variants_run_for_real(pytester: pytest.Pytester, tmp_path) -> None:
    """Each lever of a user's own inference test against that variant run for real under the plugin (the
    weights levers against the footprint of the model loaded in 8-bit and 4-bit): within 20%."""
    pytester.makepyfile(
        test_own=MODEL
        + f"""
CHECKPOINT = {str(tmp_path / "llama")!r}


@pytest.mark.gpumem
def test_as_is():
    forward(model())

@pytest.mark.gpumem
def test_inference_mode():
    with torch.inference_mode():
        forward(model())

@pytest.mark.gpumem
def test_half_batch():
    forward(model(), batch=4)

def test_footprints():
    import json
    bf16 = model()
    bf16.save_pretrained(CHECKPOINT)
    footprints = {{"bf16": bf16.get_memory_footprint()}}
    for name, quant in (
        ("8bit", BitsAndBytesConfig(load_in_8bit=True)),
        ("4bit", BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)),
    ):
        loaded = LlamaForCausalLM.from_pretrained(CHECKPOINT, dtype=torch.bfloat16, quantization_config=quant)
        footprints[name] = loaded.get_memory_footprint()
    with open("footprints.json", "w") as out:
        json.dump(footprints, out)
"""
    )
    result, tests = run_by_name(pytester, "--gpumem-explain=all")
    result.assert_outcomes(passed=4)

    def peak(name: str) -> int:
        return tests[name]["sample"]["phases"]["call"]["allocated"]["cpu"]

    footprints = json.loads((pytester.path / "footprints.json").read_text())
    levers = {lever["key"]: lever for lever in tests["test_as_is"]["advice"]["levers"]}
    real = {
        "fix": peak("test_as_is") - peak("test_inference_mode"),
        "batch": peak("test_as_is") - peak("test_half_batch"),
        "weights8": footprints["bf16"] - footprints["8bit"],
        "weights4": footprints["bf16"] - footprints["4bit"],
    }
    for key, saved in real.items():
        assert levers[key]["source"] == "estimated"
        assert saved > 0 and abs(levers[key]["saving"] - saved) <= 0.2 * saved, (key, levers[key], saved)
    assert "inference_mode" in levers["fix"]["action"]
