"""A user's own QLoRA loop on a 1B model: nf4 with double quantization, prepare_model_for_kbit_training,
LoRA r16 on all linear layers, AdamW, batch 4 x 1024, over a 16 GiB budget. Once as written (no gradient
checkpointing), once with checkpointing enabled and the model left in eval mode, as ``from_pretrained``
returns it; and each lever pulled."""

from __future__ import annotations

from pathlib import Path

import bitsandbytes as bnb
import pytest
import torch
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig


def train(
    path: Path,
    batch: int = 4,
    seq: int = 1024,
    accumulation: int = 1,
    checkpointing: bool = False,
    train_mode: bool = True,
    use_cache: bool | None = None,
    r: int = 16,
    targets: str | list[str] = "all-linear",
    optimizer: str = "adamw",
    autocast: bool = False,
) -> None:
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    base = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map={"": 0})
    base = prepare_model_for_kbit_training(base, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, task_type="CAUSAL_LM"))
    if use_cache is not None:
        model.config.use_cache = use_cache
    if train_mode:
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if optimizer == "adamw" else bnb.optim.AdamW8bit(params, lr=1e-4)
    for _ in range(2):
        for _ in range(accumulation):
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                loss = model(input_ids=ids, labels=ids).loss / accumulation
            loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.gpumem(budget="16 GiB")
def test_qlora__as_is(llama_1b: Path) -> None:
    train(llama_1b)


@pytest.mark.gpumem(budget="16 GiB")
def test_qlora_eval__as_is(llama_1b: Path) -> None:
    train(llama_1b, checkpointing=True, train_mode=False)


@pytest.mark.gpumem
def test_qlora__fix_use_cache(llama_1b: Path) -> None:
    train(llama_1b, use_cache=False)


@pytest.mark.gpumem
def test_qlora__batch(llama_1b: Path) -> None:
    train(llama_1b, batch=2, accumulation=2)


@pytest.mark.gpumem
def test_qlora__checkpointing(llama_1b: Path) -> None:
    train(llama_1b, checkpointing=True)


@pytest.mark.gpumem
def test_qlora__seq(llama_1b: Path) -> None:
    train(llama_1b, seq=512)


@pytest.mark.gpumem
def test_qlora__bf16(llama_1b: Path) -> None:
    train(llama_1b, autocast=True)


@pytest.mark.gpumem
def test_qlora__rank(llama_1b: Path) -> None:
    train(llama_1b, r=8)


@pytest.mark.gpumem
def test_qlora__targets(llama_1b: Path) -> None:
    train(llama_1b, targets=["q_proj", "v_proj"])


@pytest.mark.gpumem
def test_qlora__optimizer(llama_1b: Path) -> None:
    train(llama_1b, optimizer="adamw8bit")
