"""Model presets, random-weight checkpoints, loading and training, on real (tiny) loading."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pytest_gpumem.measure.meters.tracker import TrackerMeter
from pytest_gpumem.models import loading, presets
from pytest_gpumem.models.training import GpuMemWarning, train_steps

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return tmp_path_factory.mktemp("checkpoints")


@pytest.mark.parametrize(
    ("arch", "size", "billions"),
    [
        ("llama", "1b", 1.24),  # Llama-3.2-1B
        ("llama", "3b", 3.21),  # Llama-3.2-3B
        ("llama", "8b", 8.03),  # Llama-3.1-8B
        ("mistral", "7b", 7.25),  # Mistral-7B-v0.3
        ("mistral", "8b", 8.02),  # Ministral-8B-Instruct-2410
        ("qwen2", "0.5b", 0.49),  # Qwen2.5-0.5B
        ("qwen2", "1.5b", 1.54),  # Qwen2.5-1.5B
        ("qwen2", "3b", 3.09),  # Qwen2.5-3B
        ("qwen2", "7b", 7.62),  # Qwen2.5-7B
    ],
)
def test_real_shapes_have_the_published_parameter_counts(arch, size, billions):
    shape = presets.preset(arch, size)
    config = transformers.AutoConfig.for_model(arch, **shape.config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: presets.preset("gpt2", "tiny"), "unknown architecture 'gpt2'; choose one of llama, mistral, qwen2"),
        (lambda: presets.preset("llama", "70b"), "unknown size '70b' for llama; choose one of tiny, 1b, 3b, 8b"),
        (lambda: presets.check_choice("quant", "nf3", presets.QUANTS), "unknown quant 'nf3'; choose one of nf4, fp4"),
    ],
)
def test_bad_names_list_the_valid_ones(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_tiny_checkpoint_round_trip_through_from_pretrained(checkpoints, arch):
    path = loading.make_checkpoint(checkpoints, arch, "tiny")
    assert (path / "model.safetensors").is_file()
    again = loading.make_checkpoint(checkpoints, arch, "tiny")  # reused, not made again
    assert again == path
    model = loading.load(path, "nf4", True, "bfloat16", None)
    assert model.config.model_type == arch
    assert model.config.hidden_size == 128 and model.config.use_cache is False
    assert sum(type(m).__name__ == "Linear4bit" for m in model.modules()) == 2 * 7  # q k v o gate up down


@pytest.mark.parametrize(
    ("quant", "layer", "dtype"),
    [
        ("nf4", "Linear4bit", torch.uint8),
        ("fp4", "Linear4bit", torch.uint8),
        ("int8", "Linear8bitLt", torch.int8),
        ("bf16", "Linear", torch.bfloat16),
        ("fp16", "Linear", torch.float16),
        ("fp32", "Linear", torch.float32),
    ],
)
def test_every_quant_loads_what_it_says(checkpoints, quant, layer, dtype):
    model = loading.load(loading.make_checkpoint(checkpoints, "llama", "tiny"), quant, True, "bfloat16", None)
    proj = model.model.layers[0].self_attn.q_proj
    assert type(proj).__name__ == layer
    assert proj.weight.dtype == dtype
    if quant in ("nf4", "fp4"):
        assert proj.weight.quant_state.quant_type == quant


def test_double_quant_quantizes_the_statistics(checkpoints):
    path = loading.make_checkpoint(checkpoints, "llama", "tiny")
    single = loading.load(path, "nf4", False, "bfloat16", None).model.layers[0].self_attn.q_proj.weight.quant_state
    double = loading.load(path, "nf4", True, "bfloat16", None).model.layers[0].self_attn.q_proj.weight.quant_state
    assert single.nested is False and double.nested is True


def test_random_weights_are_the_same_every_time(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = loading.make_checkpoint(tmp_path / "a", "qwen2", "tiny")
    second = loading.make_checkpoint(tmp_path / "b", "qwen2", "tiny")
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_lora_on_a_quantized_model_prepares_it_for_kbit_training(checkpoints):
    model = loading.load(loading.make_checkpoint(checkpoints, "llama", "tiny"), "nf4", True, "bfloat16", None)
    model = loading.add_lora(model, r=4, target_modules=["q_proj", "v_proj"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 2  # A and B, q and v, two layers
    assert loading.gradient_checkpointing_enabled(model)
    assert model.peft_config["default"].lora_alpha == 8
    # prepare_model_for_kbit_training upcasts the non-quantized parameters to float32
    assert model.base_model.model.model.norm.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="lora: r must be a positive int, got 0"):
        loading.add_lora(model, r=0)


def test_train_steps_train_in_train_mode_with_phases(checkpoints):
    model = loading.load(loading.make_checkpoint(checkpoints, "llama", "tiny"), "nf4", True, "bfloat16", None)
    model = loading.add_lora(model, r=4)
    model.eval()
    opened: list[str] = []

    def phase(name: str) -> contextlib.AbstractContextManager[None]:
        opened.append(name)
        return contextlib.nullcontext()

    with pytest.warns(GpuMemWarning, match="was in eval mode; switched it to train mode"):
        losses = train_steps(model, batch=2, seq=16, steps=3, accumulation=2, phase=phase)
    assert model.training
    assert opened == ["step1", "step2", "step3"]
    assert len(losses) == 6 and all(loss > 0 for loss in losses)
    with pytest.raises(ValueError, match="train_step: batch must be a positive int, got 0"):
        train_steps(model, batch=0)


def test_gradient_checkpointing_saves_measured_activation_memory(checkpoints):
    path = loading.make_checkpoint(checkpoints, "llama", "tiny")

    def step_peak(checkpointing: bool) -> int:
        model = loading.add_lora(loading.load(path, "nf4", True, "bfloat16", None), r=4)
        meter = TrackerMeter()
        meter.begin()
        train_steps(model, batch=4, seq=64, steps=1, gradient_checkpointing=checkpointing)
        peak = sum(meter.mark()["allocated"].values())  # on a GPU machine the model is on the GPU
        meter.end()
        return peak

    assert step_peak(True) < step_peak(False)
