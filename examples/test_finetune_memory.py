"""Peak memory of fine-tuning steps, guarded by pytest-gpumem.

Every test loads its own model through ``from_pretrained`` and applies LoRA
through peft in a fixture (phase ``load`` of its setup), then runs two real
AdamW steps (phases ``step1``, ``step2``). The model comes from a fixture so
that it outlives the test body: when a test fails on memory, the advisor runs
its step again with one lever changed and reports what each lever really
saves. The reference setup is QLoRA: nf4 with double quantization, LoRA rank 8
on all linear layers, gradient checkpointing; each other setup changes one
thing. The plugin fails a test whose peak grows more than 2% over its
stored baseline, or passes its size's budget (see conftest.py).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import pytest
import torch


@dataclass(frozen=True)
class Setup:
    quant: str = "nf4"
    double_quant: bool = True
    gradient_checkpointing: bool = True
    r: int = 8
    batch: int = 2
    seq_factor: int = 1


SETUPS = {
    "qlora-nf4": Setup(),
    "qlora-nf4-single-quant": Setup(double_quant=False),
    "qlora-no-checkpointing": Setup(gradient_checkpointing=False),
    "qlora-batch4": Setup(batch=4),
    "qlora-seq-x2": Setup(seq_factor=2),
    "qlora-r64": Setup(r=64),
    "lora-bf16": Setup(quant="bf16"),
    "lora-int8": Setup(quant="int8"),
}


def sequence_length(size: str, factor: int) -> int:
    return (64 if size == "tiny" else 512) * factor


@pytest.fixture
def model(size, setup, quantized_model, lora, gpumem):
    """The setup's model, quantized and with LoRA applied."""
    with gpumem.phase("load"):
        model = quantized_model("llama", size=size, quant=setup.quant, double_quant=setup.double_quant)
        return lora(model, r=setup.r, gradient_checkpointing=setup.gradient_checkpointing)


@pytest.mark.parametrize("setup", SETUPS.values(), ids=SETUPS.keys())
def test_finetune_step(size, setup, model, train_step):
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = train_step(model, batch=setup.batch, seq=sequence_length(size, setup.seq_factor), steps=2)

    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    moved = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(moved) == len(before) > 0  # every LoRA parameter was trained


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a GPU: on the CPU the bf16 weights stay memory-mapped, unseen by the cpu meter",
)
def test_nf4_load_footprint(size, quantized_model, gpumem):
    """nf4 keeps the linear layers in about a quarter of their bf16 bytes (plus statistics);
    the embeddings and the LM head stay in bf16, so the whole model takes more than that."""
    with gpumem.phase("bf16"):
        model = quantized_model("llama", size=size, quant="bf16")
    bf16_linear = sum(m.weight.nbytes for m in model.modules() if isinstance(m, torch.nn.Linear))
    del model
    gc.collect()
    with gpumem.phase("nf4"):
        model = quantized_model("llama", size=size, quant="nf4")
    quantized = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    nf4_linear = sum(m.weight.nbytes + m.weight.quant_state.absmax.nbytes for m in quantized)
    assert quantized and nf4_linear < 0.3 * bf16_linear
    assert gpumem.peak(phase="nf4") < gpumem.peak(phase="bf16")
