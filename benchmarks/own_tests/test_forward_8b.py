"""The classic broken example of every "CUDA out of memory" guide: an 8B model loaded in bf16, one forward
pass at batch 16 x 512, with autograd on and nothing calling backward, under a 16 GiB device limit; and each
lever pulled."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

QUANT = {
    8: BitsAndBytesConfig(load_in_8bit=True),
    4: BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    ),
}


def forward(path: Path, batch: int = 16, seq: int = 512, inference: bool = False, bits: int | None = None) -> None:
    quant = QUANT.get(bits or 0)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.bfloat16, quantization_config=quant, device_map={"": 0}
    )
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    with torch.inference_mode(inference):
        outputs = model(input_ids=ids)
    assert outputs.logits.shape[0] == batch


@pytest.mark.gpumem(device_limit="16 GiB")
def test_forward8b__as_is(llama_8b: Path) -> None:
    forward(llama_8b)


@pytest.mark.gpumem
def test_forward8b__fix_inference_mode(llama_8b: Path) -> None:
    forward(llama_8b, inference=True)


@pytest.mark.gpumem
def test_forward8b__batch(llama_8b: Path) -> None:
    forward(llama_8b, batch=8)


@pytest.mark.gpumem
def test_forward8b__seq(llama_8b: Path) -> None:
    forward(llama_8b, seq=256)


@pytest.mark.gpumem
def test_forward8b__weights8(llama_8b: Path) -> None:
    forward(llama_8b, bits=8, inference=True)  # beside the fixed forward: the weights' own saving


@pytest.mark.gpumem
def test_forward8b__weights4(llama_8b: Path) -> None:
    forward(llama_8b, bits=4, inference=True)


@pytest.mark.gpumem
def test_forward8b__unlimited(llama_8b: Path) -> None:
    forward(llama_8b)  # the as-is test without its limit: what it needs
