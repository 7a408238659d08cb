"""Advice for a user's own test: its own model, its own loop, nothing registered. The plugin finds the
model and the optimizer, says what is wrong, and gives each lever a number, replayed on fake tensors where
the step cannot be run again."""

from __future__ import annotations

import pytest
from inner_run import run_by_name

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
    result, tests = run_by_name(pytester)
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
    result, tests = run_by_name(pytester)
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
    result, tests = run_by_name(pytester)
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
    result, tests = run_by_name(pytester)
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
    result, tests = run_by_name(pytester, "--gpumem-explain=all")
    levers = {lever["key"]: lever for lever in tests["test_all_linear"]["advice"]["levers"]}
    assert levers["rank"]["action"] == "LoRA r 8 -> 4"
    assert levers["targets"]["action"].startswith("LoRA on q_proj, v_proj only, not 7 target modules")
    # Dropping five of seven adapters frees their inputs too: far more than halving the rank.
    assert levers["targets"]["saving"] > 2 * levers["rank"]["saving"] > 0
    result.stdout.fnmatch_lines(["*fewer LoRA target modules: LoRA on q_proj, v_proj only*"])


LOOP = """
import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM

CONFIG = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
              num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
NF4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                         bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**CONFIG)).to(DTYPE).save_pretrained(path)
    return path


def build(lora=None, checkpoint=None, use_cache=False, float32=False):
    \"\"\"The tiny Llama in DTYPE (in nf4 from ``checkpoint``), with LoRA of ``lora`` = (r, targets) if given.\"\"\"
    torch.manual_seed(0)
    if checkpoint:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, quantization_config=NF4, dtype=torch.bfloat16)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = LlamaForCausalLM(LlamaConfig(**CONFIG, dtype=CONFIG_DTYPE)).to(DTYPE)
    model.config.use_cache = use_cache
    if lora:
        model = get_peft_model(model, LoraConfig(r=lora[0], target_modules=lora[1], task_type="CAUSAL_LM"))
    return model.float() if float32 else model


def train(model, batch=4, seq=64, accumulation=1, checkpointing=False, eval_mode=False, autocast=False,
          adamw8bit=False):
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.eval() if eval_mode else model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    if adamw8bit:
        import bitsandbytes

        optimizer = bitsandbytes.optim.AdamW8bit(params, lr=1e-4)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    for _ in range(2):
        for _ in range(accumulation):
            ids = torch.randint(0, 256, (batch, seq))
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
        optimizer.step()
        optimizer.zero_grad()
"""

LORA_LOOP = """
DTYPE, CONFIG_DTYPE = torch.bfloat16, "bfloat16"
LORA = (8, "all-linear")

@pytest.mark.gpumem
def test_as_is():
    train(build(LORA))

@pytest.mark.gpumem
def test_smaller_batch():
    train(build(LORA), batch=2, accumulation=2)

@pytest.mark.gpumem
def test_checkpointing():
    train(build(LORA), checkpointing=True)

@pytest.mark.gpumem
def test_shorter_sequences():
    train(build(LORA), seq=32)

@pytest.mark.gpumem
def test_qlora(checkpoint):
    train(build(LORA, checkpoint))

@pytest.mark.gpumem
def test_lower_rank():
    train(build((4, "all-linear")))

@pytest.mark.gpumem
def test_fewer_targets():
    train(build((8, ["q_proj", "v_proj"])))

@pytest.mark.gpumem
def test_adamw8bit():
    train(build(LORA), adamw8bit=True)

@pytest.mark.gpumem
def test_eval_mode_checkpointing():  # fixed: test_checkpointing
    train(build(LORA), checkpointing=True, eval_mode=True)

@pytest.mark.gpumem
def test_use_cache():  # fixed: test_as_is
    train(build(LORA, use_cache=True))

@pytest.mark.gpumem
def test_float32_weights():  # fixed: test_as_is
    train(build(LORA, float32=True))

def forward(batch=8, inference_mode=False, times=1):
    model = build(LORA).eval()
    for _ in range(times):
        with torch.inference_mode(inference_mode):
            model(input_ids=torch.randint(0, 256, (batch, 64)))

@pytest.mark.gpumem
def test_forward():
    forward()

@pytest.mark.gpumem
def test_forward_in_inference_mode():
    forward(inference_mode=True)

@pytest.mark.gpumem
def test_forward_in_smaller_batches():
    forward(batch=4, times=2)
"""

FULL_LOOP = """
DTYPE, CONFIG_DTYPE = torch.float32, None

@pytest.mark.gpumem
def test_as_is():
    train(build())

@pytest.mark.gpumem
def test_autocast():
    train(build(), autocast=True)

@pytest.mark.gpumem
def test_lora():
    train(build((16, "all-linear")))

@pytest.mark.gpumem
def test_qlora(checkpoint):
    train(build((16, "all-linear"), checkpoint))

@pytest.mark.gpumem
def test_adamw8bit():
    train(build(), adamw8bit=True)

@pytest.mark.gpumem
def test_autocast_use_cache():  # fixed: test_autocast
    train(build(use_cache=True), autocast=True)
"""


def compare(tests: dict, variants: dict[tuple[str, str, str], str]) -> None:
    """Each lever ``(test, key, words of its action)`` against the saving measured by running ``test`` and its
    variant for real under the plugin: within 20%, or both ~nothing (under 1% of the peak) where the lever
    gives nothing back in this setup."""

    def peak(name: str) -> int:
        return tests[name]["sample"]["phases"]["call"]["allocated"]["cpu"]

    for (name, key, words), variant in variants.items():
        levers = tests[name]["advice"]["levers"]
        lever = next(lever for lever in levers if lever["key"] == key and words in lever["action"])
        saved, told = peak(name) - peak(variant), lever["saving"]
        assert lever["source"] == "estimated", lever
        what = (name, key, told, saved, lever["basis"])
        if abs(saved) < 0.01 * peak(name):
            assert abs(told) < 0.01 * peak(name), what
        else:
            assert abs(told - saved) <= 0.2 * abs(saved), what


def test_savings_match_the_variants_run_for_real(pytester: pytest.Pytester) -> None:
    """Each lever and fix of a user's own LoRA loop and inference (estimated, on the cpu backend) against the
    same code run for real with that lever, under the plugin."""
    pytester.makepyfile(test_own=LOOP + LORA_LOOP)
    result, tests = run_by_name(pytester, "--gpumem-explain=all")
    result.assert_outcomes(passed=14)
    compare(
        tests,
        {
            ("test_as_is", "batch", "accumulation"): "test_smaller_batch",
            ("test_as_is", "checkpointing", ""): "test_checkpointing",
            ("test_as_is", "seq", ""): "test_shorter_sequences",
            ("test_as_is", "rank", "r 8 -> 4"): "test_lower_rank",
            ("test_as_is", "targets", "q_proj, v_proj only"): "test_fewer_targets",
            # bf16 LoRA into QLoRA on a tiny model: 4-bit weights free less than the float32 upcasts cost
            ("test_as_is", "qlora", ""): "test_qlora",
            ("test_as_is", "optimizer", ""): "test_adamw8bit",  # LoRA's tensors are too small for 8-bit state
            ("test_eval_mode_checkpointing", "fix", "model.train()"): "test_checkpointing",
            # the cpu's attention keeps the very keys and values the cache holds
            ("test_use_cache", "fix", "use_cache"): "test_as_is",
            ("test_float32_weights", "fix", "dtype"): "test_as_is",
            ("test_forward", "fix", "inference_mode"): "test_forward_in_inference_mode",
            ("test_forward", "batch", "smaller batches"): "test_forward_in_smaller_batches",
        },
    )
    findings = {name: " ".join(tests[name]["advice"]["findings"]) for name in tests}
    assert "eval mode" in findings["test_eval_mode_checkpointing"]
    assert "use_cache=True" in findings["test_use_cache"]
    assert "weights are float32" in findings["test_float32_weights"]
    assert "autograd on" in findings["test_forward"]


def test_full_fine_tuning_savings_match_the_variants_run_for_real(pytester: pytest.Pytester) -> None:
    """The levers of full fine-tuning a float32 model (bf16 autocast, LoRA, QLoRA, 8-bit AdamW) against the
    loop run for real with each, under the plugin."""
    pytester.makepyfile(test_own=LOOP + FULL_LOOP)
    result, tests = run_by_name(pytester, "--gpumem-explain=all")
    result.assert_outcomes(passed=6)
    compare(
        tests,
        {
            ("test_as_is", "bf16", "autocast"): "test_autocast",
            ("test_as_is", "lora", "r=16"): "test_lora",
            ("test_as_is", "qlora", "nf4"): "test_qlora",
            ("test_as_is", "optimizer", "8-bit"): "test_adamw8bit",
            # under autocast the cache keeps float32 keys and values beside the bf16 copies attention keeps
            ("test_autocast_use_cache", "fix", "use_cache"): "test_autocast",
        },
    )
