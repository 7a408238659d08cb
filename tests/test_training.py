"""``train_steps``' knobs on a real tiny model: autocast and the optimizer, and one-line errors for bad values."""

from __future__ import annotations

import contextlib

import pytest
import torch

from pytest_gpumem.models import loading
from pytest_gpumem.models.training import train_steps

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return loading.make_checkpoint(tmp_path_factory.mktemp("checkpoints"), "llama", "tiny")


def lora_model(checkpoint, quant: str = "fp32"):
    # An fp32 model computes in fp32 unless autocast says otherwise: the dtype tells them apart.
    return loading.add_lora(loading.load(checkpoint, quant, False, "float32", None), r=4, gradient_checkpointing=False)


def logits_dtypes(model, **knobs) -> set[torch.dtype]:
    """The dtypes of the lm_head's outputs over the run."""
    seen: set[torch.dtype] = set()
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
    try:
        train_steps(model, batch=2, seq=16, steps=1, **knobs)
    finally:
        handle.remove()
    return seen


@pytest.mark.parametrize(
    ("autocast", "dtype"), [(None, torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_autocast_runs_the_forward_pass_in_its_dtype(checkpoint, autocast, dtype):
    assert logits_dtypes(lora_model(checkpoint), autocast=autocast) == {dtype}


def test_autocast_does_not_reach_backward(checkpoint):
    model = lora_model(checkpoint)
    seen: set[bool] = set()

    def hook(_module, _grad_in, _grad_out):
        seen.add(torch.is_autocast_enabled("cpu"))

    handle = model.get_output_embeddings().register_full_backward_hook(hook)
    try:
        train_steps(model, batch=2, seq=16, steps=1, autocast="bfloat16")
    finally:
        handle.remove()
    assert seen == {False}


def optimizer_state_dtypes(model, optimizer: str) -> set[torch.dtype]:
    """The dtypes of the optimizer's state tensors the size of a LoRA matrix or larger, after a step."""
    import torch.optim

    made: list[torch.optim.Optimizer] = []
    original = torch.optim.Optimizer.__init__

    def remember(self, *args, **kwargs):
        original(self, *args, **kwargs)
        made.append(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.optim.Optimizer, "__init__", remember)
        train_steps(model, batch=2, seq=16, steps=1, optimizer=optimizer)
    (opt,) = made
    return {
        value.dtype
        for state in opt.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor) and value.numel() >= 4096
    }


@pytest.mark.parametrize(
    ("optimizer", "dtypes"),
    [("adamw", {torch.float32}), ("adamw8bit", {torch.uint8}), ("paged_adamw8bit", {torch.uint8})],
)
def test_optimizer_state_is_what_the_optimizer_keeps(checkpoint, optimizer, dtypes):
    pytest.importorskip("bitsandbytes")
    # r=32 makes each LoRA matrix 4096 elements or more: bitsandbytes keeps smaller ones in float32.
    model = loading.add_lora(
        loading.load(checkpoint, "fp32", False, "float32", None), r=32, gradient_checkpointing=False
    )
    # The tiny model is on the CPU, where bitsandbytes runs a paged optimizer unpaged, and says so.
    paged_on_cpu = pytest.warns(UserWarning, match="Paged optimizers are not supported on CPU")
    with paged_on_cpu if optimizer == "paged_adamw8bit" else contextlib.nullcontext():
        assert optimizer_state_dtypes(model, optimizer) == dtypes


@pytest.mark.parametrize(
    ("knobs", "message"),
    [
        ({"autocast": "float8"}, "train_step: unknown autocast 'float8'; choose one of bfloat16, float16 or None"),
        ({"autocast": "bf16"}, "train_step: unknown autocast 'bf16'; choose one of bfloat16, float16 or None"),
        (
            {"optimizer": "adam"},
            "train_step: unknown optimizer 'adam'; choose one of adamw, adamw8bit, paged_adamw8bit",
        ),
        ({"optimizer": None}, "train_step: unknown optimizer None; choose one of adamw, adamw8bit, paged_adamw8bit"),
    ],
)
def test_bad_knobs_are_named_in_one_line(checkpoint, knobs, message):
    model = lora_model(checkpoint)
    model.eval()
    with pytest.raises(ValueError) as raised:
        train_steps(model, batch=2, seq=16, steps=1, **knobs)
    assert str(raised.value) == message
    assert "\n" not in str(raised.value)
    assert not model.training  # checked before anything was changed
