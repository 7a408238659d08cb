"""A tiny QLoRA fine-tuning library, as a training repository would have one.

Everything the example tests measure goes through the real code paths:
``AutoModelForCausalLM.from_pretrained`` with a bitsandbytes 4-bit
``BitsAndBytesConfig``, peft's ``prepare_model_for_kbit_training`` and
``get_peft_model``, and a plain PyTorch training loop (no ``Trainer``).

The model is a randomly initialised, very small Llama (``TINY_LLAMA``) saved
once to disk by ``make_checkpoint``, since the examples must run without
network access. Every random number is seeded and every shape is fixed, so a
test allocates exactly the same tensors, byte for byte, on every run.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig

# A Llama small enough for a test to load and train it in well under a second
# on a laptop CPU, with the real architecture: grouped-query attention, SwiGLU
# MLP, RMSNorm, rotary embeddings and an untied LM head.
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=512,
    tie_word_embeddings=False,
    use_cache=False,
)

LEARNING_RATE = 1e-3


def make_checkpoint(directory: str | Path) -> Path:
    """Save a bf16 ``TINY_LLAMA`` with fixed random weights to ``directory`` (once).

    Returns the directory. If a checkpoint is already there it is reused as is.
    """
    path = Path(directory)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_LLAMA), dtype=torch.bfloat16)
    # Write next to the target and move into place, so that a half-written
    # checkpoint (an interrupted run, a parallel worker) is never picked up.
    staging = path.parent / f"{path.name}.partial-{os.getpid()}"
    model.save_pretrained(staging)  # transformers 5 always writes safetensors
    path.mkdir(parents=True, exist_ok=True)
    for item in sorted(staging.iterdir(), key=lambda item: item.name == "config.json"):
        os.replace(item, path / item.name)  # config.json last
    staging.rmdir()
    return path


def load_qlora(
    path: str | Path,
    *,
    quant: str = "nf4",
    double_quant: bool = True,
    r: int = 8,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = True,
    seed: int = 0,
) -> PeftModel:
    """Load ``path`` in 4 bit (bitsandbytes) and wrap it in a trainable LoRA adapter."""
    quantization_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant,
        bnb_4bit_use_double_quant=double_quant,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=quantization_config, dtype=torch.bfloat16)
    with _peft_on_transformers_5():
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            # peft passes `{}` on when this is left out, which overrides the
            # `use_reentrant=False` default of transformers and makes
            # torch.utils.checkpoint warn about the missing argument.
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
    return _add_lora(model, r=r, target_modules=target_modules, seed=seed)


def load_lora_bf16(
    path: str | Path,
    r: int = 8,
    *,
    target_modules: str | list[str] = "all-linear",
    seed: int = 0,
) -> PeftModel:
    """Load ``path`` in bf16 (no quantization) and wrap it in a trainable LoRA adapter."""
    # On a GPU machine put it on the current GPU, as bitsandbytes does with the
    # 4-bit models by itself; on the CPU keep transformers' default.
    device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device_map)
    return _add_lora(model, r=r, target_modules=target_modules, seed=seed)


def _add_lora(model: Any, *, r: int, target_modules: str | list[str], seed: int) -> PeftModel:
    config = LoraConfig(
        r=r,
        lora_alpha=2 * r,
        target_modules=target_modules,
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)  # LoRA A matrices are initialised from the global generator
    with _peft_on_transformers_5():
        model = get_peft_model(model, config)
    model.config.use_cache = False
    return model


@contextlib.contextmanager
def _peft_on_transformers_5() -> Iterator[None]:
    """Silence the FutureWarnings peft triggers by calling transformers 5's deprecated names.

    (``gradient_checkpointing_enable`` and ``is_gradient_checkpointing``, now
    ``activation_checkpointing_*``); there is nothing for a user to act on.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"`(gradient_checkpointing_enable|is_gradient_checkpointing)` is deprecated",
            category=FutureWarning,
        )
        yield


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the trainable (LoRA) parameters, to check that training moved them."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def train_steps(
    model: PeftModel,
    *,
    batch: int,
    seq: int,
    steps: int = 2,
    seed: int = 0,
    phase: Callable[[str], AbstractContextManager] | None = None,
) -> list[float]:
    """Run ``steps`` AdamW steps on random token batches; return the losses.

    ``phase``, if given, is a context-manager factory (``gpumem.phase``) that
    wraps each step as ``phase("step0")``, ``phase("step1")``, ...
    """
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    vocab_size = model.config.vocab_size
    device = model.get_input_embeddings().weight.device
    losses = []
    for i in range(steps):
        with phase(f"step{i}") if phase is not None else contextlib.nullcontext():
            input_ids = torch.randint(0, vocab_size, (batch, seq), generator=generator).to(device)
            losses.append(_step(model, optimizer, input_ids))
            del input_ids
    return losses


def _step(model: PeftModel, optimizer: torch.optim.Optimizer, input_ids: torch.Tensor) -> float:
    # A function of its own so that the outputs (logits and all) are released
    # when it returns, not kept alive into the next step's forward pass.
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.item()
