"""A test's own model replayed on fake tensors: the what-ifs of a test that registered no step.

The test ran its own loop, so there is no step to run again. What discovery and introspection saw of it
(the model's config, its quantization, its LoRA adapters, checkpointing, the optimizer, the batch and
sequence it was called with) is a :class:`~pytest_gpumem.estimate.engine.Recipe`; the estimate engine
builds that model on the fake GPU and trains it, once as it ran and once per lever. The levers' savings
are differences between replays; the replay's own peak, beside the measured one, shows how faithful it is.

Replayed: transformers causal LMs trained with LoRA adapters (QLoRA above all), with AdamW or a
bitsandbytes 8-bit AdamW, which is what the engine builds. Anything else is left to the estimates.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_gpumem.core.gpus import Gpu
from pytest_gpumem.core.units import format_bytes
from pytest_gpumem.estimate import engine
from pytest_gpumem.measure.introspect import TrainingSetup

OPTIMIZERS = {"AdamW": "adamw", "AdamW8bit": "adamw8bit", "PagedAdamW8bit": "paged_adamw8bit"}
"""Optimizer classes the engine builds, by the name the test's optimizer has."""
FAITHFUL = 0.05
"""A replay whose own peak differs from the measured one by more than this share is said to."""
_UNQUANTIZED = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


@dataclass
class Replay:
    """A recipe of the test's model, the GPU it is replayed as, and where its config was written."""

    recipe: engine.Recipe
    gpu: Gpu
    directory: tempfile.TemporaryDirectory[str]
    name: str  # the model's, as its config names it: "llama"
    workspaces: bool  # count the cuBLAS workspaces, as a CUDA measurement does (a cpu one has none)

    @property
    def knobs(self) -> dict[str, Any]:
        """The knobs the test ran with, as the replay reads them (the advisor turns them one at a time)."""
        return engine.knobs_of(self.recipe)

    def measure(self, overrides: dict[str, Any], *, gradients_alive: bool = False) -> int:
        """The replayed peak with ``overrides`` (the advisor's knobs) applied; a what-if ``Measure``."""
        peak = engine.run_step(engine.with_knobs(self.recipe, overrides), self.gpu, attribute=False).peak
        return peak if self.workspaces else peak - self.gpu.workspace

    def fidelity(self, measured: int, replayed: int) -> str:
        """One line: the replay's own peak beside the measured one, and whether they differ by more than
        :data:`FAITHFUL`."""
        share = (replayed - measured) / measured if measured else 0.0
        recipe = self.recipe.describe().replace(str(self.recipe.config), f"{self.name} config")
        text = (
            f"replayed this model on fake tensors for the {self.gpu.name} ({recipe}): peak "
            f"{format_bytes(replayed)} against {format_bytes(measured)} measured ({share:+.1%})"
        )
        if abs(share) > FAITHFUL:
            text += f"; they differ by more than {FAITHFUL:.0%}, so read the replayed savings as rough"
        return text


def plan(config: Any, setup: TrainingSetup, gpu: Gpu, workspaces: bool) -> tuple[Replay | None, str]:
    """A :class:`Replay` of the model of ``config`` (its transformers config) as ``setup`` describes it, or
    None and why it cannot be replayed. ``workspaces``: count the cuBLAS workspaces in its peaks (as a
    CUDA measurement does)."""
    if config is None or not callable(getattr(config, "to_json_file", None)):
        return None, "not a transformers model"
    if not setup.lora_r:
        return None, "no LoRA adapters (the replay builds LoRA and QLoRA setups)"
    if not setup.batch or not setup.seq:
        return None, "no batch and sequence seen"
    optimizer = OPTIMIZERS.get(setup.optimizer or "")
    if optimizer is None:
        return None, f"an optimizer the replay does not build ({setup.optimizer or 'none seen'})"
    if setup.quant in ("nf4", "fp4", "int8"):
        quant = setup.quant
    elif setup.weight_dtype in _UNQUANTIZED:
        quant = _UNQUANTIZED[setup.weight_dtype]
    else:
        return None, f"weights of an unknown kind ({setup.quant or setup.weight_dtype})"
    directory = tempfile.TemporaryDirectory(prefix="gpumem-replay-")
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    text.to_json_file(str(Path(directory.name) / "config.json"))
    checkpointing = bool(setup.gradient_checkpointing and setup.checkpointing_effective is not False)
    recipe = engine.Recipe(
        config=Path(directory.name),
        quant=quant,
        double_quant=bool(setup.double_quant),
        compute_dtype=setup.compute_dtype if setup.compute_dtype in ("bfloat16", "float16", "float32") else "bfloat16",
        lora_r=setup.lora_r,
        lora_targets=tuple(setup.lora_targets) or "all-linear",
        batch=setup.batch,
        seq=setup.seq,
        gradient_checkpointing=checkpointing,
        checkpointing=setup.checkpointing_variant or "reentrant",
        optimizer=optimizer,
        autocast=setup.autocast if setup.autocast in ("bfloat16", "float16") else None,
        loop="trainer" if setup.outputs_kept is False else "plain",
        use_cache=setup.use_cache,
    )
    return Replay(recipe, gpu, directory, str(getattr(text, "model_type", "") or "model"), workspaces), ""
