"""Peak tensor memory of LoRA/QLoRA fine-tuning steps, guarded by pytest-gpumem.

Each test loads its own model inside the test body (so loading is measured, as
the ``load`` phase) and runs two real optimizer steps (phases ``step0`` and
``step1``; the first also creates AdamW's state). The plugin records each
test's peak and fails the test when the peak grows past its stored baseline by
more than ``tolerance``, or past ``budget`` at all.

The reference configuration is QLoRA: nf4 with double quantization, LoRA rank
8 on all linear layers, gradient checkpointing, batch 2 of 64 tokens. Each
other test changes one thing. Budgets are about 1.6-1.8x the peaks measured
with the cpu backend; the baselines hold the exact bytes.
"""

from __future__ import annotations

import math

import pytest
import torch
from finetune import load_lora_bf16, load_qlora, lora_state, train_steps

BATCH, SEQ = 2, 64


def assert_trained(model: torch.nn.Module, before: dict[str, torch.Tensor], losses: list[float]) -> None:
    """The steps really ran: finite losses, and every LoRA parameter moved."""
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    after = lora_state(model)
    assert after and after.keys() == before.keys()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert not unchanged, f"LoRA parameters not updated: {unchanged[:3]}"


@pytest.mark.gpumem(budget="6 MiB", tolerance="2%")
def test_qlora_nf4_step(checkpoint, gpumem):
    with gpumem.phase("load"):
        model = load_qlora(checkpoint)
    before = lora_state(model)
    losses = train_steps(model, batch=BATCH, seq=SEQ, phase=gpumem.phase)
    assert_trained(model, before, losses)
    # The model (4-bit weights, the norms, embeddings and LM head that peft
    # upcasts to fp32, the adapter) lives through the whole test, so the peak
    # so far is at least its size.
    resident = sum(t.nbytes for t in (*model.parameters(), *model.buffers()))
    assert gpumem.peak() >= resident


@pytest.mark.gpumem(budget="6 MiB", tolerance="2%")
def test_qlora_nf4_without_double_quant(checkpoint, gpumem):
    with gpumem.phase("load"):
        model = load_qlora(checkpoint, double_quant=False)
    before = lora_state(model)
    losses = train_steps(model, batch=BATCH, seq=SEQ, phase=gpumem.phase)
    assert_trained(model, before, losses)


@pytest.mark.gpumem(budget="8 MiB", tolerance="2%")
def test_qlora_without_gradient_checkpointing(checkpoint, gpumem):
    with gpumem.phase("load"):
        model = load_qlora(checkpoint, gradient_checkpointing=False)
    before = lora_state(model)
    losses = train_steps(model, batch=BATCH, seq=SEQ, phase=gpumem.phase)
    assert_trained(model, before, losses)


# Activations grow with batch x sequence, so each shape gets a budget of its
# own: a marker on a parameter set is closer to the test than one on the function.
@pytest.mark.parametrize(
    "batch,seq",
    [
        pytest.param(1, 64, marks=pytest.mark.gpumem(budget="4 MiB", tolerance="2%")),
        pytest.param(4, 64, marks=pytest.mark.gpumem(budget="8 MiB", tolerance="2%")),
        pytest.param(2, 128, marks=pytest.mark.gpumem(budget="8 MiB", tolerance="2%")),
    ],
)
def test_qlora_shapes(checkpoint, gpumem, batch, seq):
    with gpumem.phase("load"):
        model = load_qlora(checkpoint)
    before = lora_state(model)
    losses = train_steps(model, batch=batch, seq=seq, phase=gpumem.phase)
    assert_trained(model, before, losses)


@pytest.mark.gpumem(budget="12 MiB", tolerance="2%")
def test_qlora_rank_64(checkpoint, gpumem):
    with gpumem.phase("load"):
        model = load_qlora(checkpoint, r=64)
    before = lora_state(model)
    losses = train_steps(model, batch=BATCH, seq=SEQ, phase=gpumem.phase)
    assert_trained(model, before, losses)


@pytest.mark.gpumem(budget="6 MiB", tolerance="2%")
def test_lora_bf16(checkpoint, gpumem):
    with gpumem.phase("load"):
        model = load_lora_bf16(checkpoint, r=8)
    before = lora_state(model)
    losses = train_steps(model, batch=BATCH, seq=SEQ, phase=gpumem.phase)
    assert_trained(model, before, losses)
