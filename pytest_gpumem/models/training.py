"""Real optimizer steps on random token batches, each recorded as a phase."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from pytest_gpumem.models.loading import set_gradient_checkpointing


class GpuMemWarning(UserWarning):
    """Something about a measured setup the user should know (it changes what is measured)."""


AUTOCAST_DTYPES = ("bfloat16", "float16")
"""Dtypes ``train_steps`` can run the forward pass and loss under ``torch.autocast`` with."""

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
"""``adamw``: ``torch.optim.AdamW`` (two float32 states per parameter); ``adamw8bit`` and
``paged_adamw8bit``: bitsandbytes' blockwise 8-bit AdamW, the paged one with its state in
CUDA unified memory (on the CPU, bitsandbytes runs it unpaged and warns)."""


def train_steps(
    model: Any,
    *,
    batch: int = 2,
    seq: int = 64,
    steps: int = 2,
    accumulation: int = 1,
    gradient_checkpointing: bool | None = None,
    autocast: str | None = None,
    optimizer: str = "adamw",
    lr: float = 1e-4,
    seed: int = 0,
    phase: Callable[[str], AbstractContextManager[None]] | None = None,
) -> list[float]:
    """Run ``steps`` optimizer steps, each over ``accumulation`` micro-batches of ``batch`` x ``seq`` tokens.

    Each step (forward, loss, backward for every micro-batch, then optimizer
    step and ``zero_grad``) is wrapped in ``phase("step1")``, ``phase("step2")``, ...
    The model is put in train mode, with a warning if it was not: gradient
    checkpointing does nothing in eval mode. ``gradient_checkpointing`` None
    leaves the model's setting as it is. ``autocast`` (one of
    :data:`AUTOCAST_DTYPES`, or None) runs the forward pass and the loss under
    ``torch.autocast`` on the model's device, and backward outside it, as mixed
    precision recipes do; ``optimizer`` is one of :data:`OPTIMIZERS`. Returns the
    loss of every micro-batch.
    """
    import torch

    for name, value in (("batch", batch), ("seq", seq), ("steps", steps), ("accumulation", accumulation)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"train_step: {name} must be a positive int, got {value!r}")
    if autocast is not None and autocast not in AUTOCAST_DTYPES:
        choices = ", ".join(AUTOCAST_DTYPES)
        raise ValueError(f"train_step: unknown autocast {autocast!r}; choose one of {choices} or None")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"train_step: unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if optimizer != "adamw" and importlib.util.find_spec("bitsandbytes") is None:
        raise ValueError(f"train_step: optimizer {optimizer!r} needs bitsandbytes, which is not installed")
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
    device = model.get_input_embeddings().weight.device
    optim = _make_optimizer(optimizer, params, lr)
    mixed = (
        functools.partial(torch.autocast, device.type, getattr(torch, autocast)) if autocast else contextlib.nullcontext
    )
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    losses: list[float] = []
    for step in range(1, steps + 1):
        with phase(f"step{step}") if phase else contextlib.nullcontext():
            for _ in range(accumulation):
                tokens = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
                losses.append(_forward_backward(model, tokens, accumulation, mixed))
                del tokens
            optim.step()
            optim.zero_grad(set_to_none=True)
    return losses


def _make_optimizer(name: str, params: list[Any], lr: float) -> Any:
    """The optimizer called ``name`` (one of :data:`OPTIMIZERS`) over ``params``."""
    import torch

    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    import bitsandbytes

    if name == "adamw8bit":
        return bitsandbytes.optim.AdamW8bit(params, lr=lr)
    # On the CPU, bitsandbytes runs a paged optimizer unpaged (the same state, in ordinary
    # memory) and says so in a warning at its first step: left for the user to see.
    return bitsandbytes.optim.PagedAdamW8bit(params, lr=lr)


def _forward_backward(
    model: Any, tokens: Any, accumulation: int, mixed: Callable[[], AbstractContextManager[Any]]
) -> float:
    # A function of its own, so that the logits die when it returns instead of
    # living on into the next micro-batch's forward pass.
    with mixed():
        loss = model(input_ids=tokens, labels=tokens).loss
    (loss / accumulation).backward()
    return float(loss.item())
