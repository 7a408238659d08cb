"""Real optimizer steps on random token batches, each recorded as a phase."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from .models import set_gradient_checkpointing


class GpuMemWarning(UserWarning):
    """Something about a measured setup the user should know (it changes what is measured)."""


def train_steps(
    model: Any,
    *,
    batch: int = 2,
    seq: int = 64,
    steps: int = 2,
    accumulation: int = 1,
    gradient_checkpointing: bool | None = None,
    lr: float = 1e-4,
    seed: int = 0,
    phase: Callable[[str], AbstractContextManager[None]] | None = None,
) -> list[float]:
    """Run ``steps`` AdamW steps, each over ``accumulation`` micro-batches of ``batch`` x ``seq`` tokens.

    Each step (forward, loss, backward for every micro-batch, then optimizer
    step and ``zero_grad``) is wrapped in ``phase("step1")``, ``phase("step2")``, ...
    The model is put in train mode, with a warning if it was not: gradient
    checkpointing does nothing in eval mode. ``gradient_checkpointing`` None
    leaves the model's setting as it is. Returns the loss of every micro-batch.
    """
    import torch

    for name, value in (("batch", batch), ("seq", seq), ("steps", steps), ("accumulation", accumulation)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"train_step: {name} must be a positive int, got {value!r}")
    if not model.training:
        warnings.warn(
            GpuMemWarning(
                "train_step: the model was in eval mode; switched it to train mode "
                "(gradient checkpointing does nothing in eval mode)"
            ),
            stacklevel=2,
        )
    model.train()
    if gradient_checkpointing is not None:
        set_gradient_checkpointing(model, gradient_checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train_step: the model has no trainable parameters (apply lora first, or unfreeze it)")
    optimizer = torch.optim.AdamW(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)
    device = model.get_input_embeddings().weight.device
    vocab = model.config.vocab_size
    losses: list[float] = []
    for step in range(1, steps + 1):
        with phase(f"step{step}") if phase else contextlib.nullcontext():
            for _ in range(accumulation):
                tokens = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
                losses.append(_forward_backward(model, tokens, accumulation))
                del tokens
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return losses


def _forward_backward(model: Any, tokens: Any, accumulation: int) -> float:
    # A function of its own, so that the logits die when it returns instead of
    # living on into the next micro-batch's forward pass.
    loss = model(input_ids=tokens, labels=tokens).loss
    (loss / accumulation).backward()
    return float(loss.item())
