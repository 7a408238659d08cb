"""Predict a QLoRA training step's GPU memory without a GPU: the recipe behind ``gpumem estimate``.

The standard QLoRA recipe runs for real, on fake tensors (the ``estimate``
backend's meta device standing in for one CUDA GPU, see
:mod:`pytest_gpumem.estimate.meter`), doing what the user's stack does: the
model built from its config (any architecture transformers builds from a
``config.json``), its decoder's linear layers quantized as ``from_pretrained``
quantizes them, one weight at a time; ``prepare_model_for_kbit_training`` with
the recipe's checkpointing variant (reentrant, peft's default, or not); peft
LoRA (alpha = 2r); the config's ``use_cache`` (a KV cache of copies in
training without checkpointing); AdamW; and the training loop as users write
it (the outputs, and their float32 logits, alive through backward) or as
transformers' Trainer runs it. A warm-up step, then the step that is measured.
No weight is materialised: an 8B model costs its config. What the recipe
assumed is said with the estimate (:meth:`Recipe.assumptions`).

Every storage goes through a model of the CUDA caching allocator
(:mod:`pytest_gpumem.estimate.allocator`): the step's allocated peak is what it charges
(plus the cuBLAS workspaces), reserved is its segments (modelled), and device
adds the context of :mod:`pytest_gpumem.core.gpus`. Where the fake run fails (an
operator without a meta implementation, a model class that needs real data),
the estimate falls back to the advisor's analytic layer model, says so, labels
every lever a formula, and ``gpumem estimate`` exits 4.
"""

from __future__ import annotations

import contextlib
import functools
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_gpumem.advise import advisor, findings
from pytest_gpumem.advise.memory_model import (
    LINEAR_NAMES,
    Precision,
    Shape,
    checkpoint_bytes,
    layer_bytes,
    lora_tensor_sizes,
    nf4_bytes,
)
from pytest_gpumem.core.gpus import Gpu, device_bytes, reserved_bytes, whole_segments
from pytest_gpumem.core.sample import Attribution, Breakdown, Lever
from pytest_gpumem.core.units import BadValue, error_line
from pytest_gpumem.estimate.meter import DEVICE, EstimateMeter, active_tracker, forget_meta_caches, untracked
from pytest_gpumem.measure import introspect
from pytest_gpumem.measure.introspect import TrainingSetup
from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.models import loading, presets, training
from pytest_gpumem.models.training import _make_optimizer

QUANTS = ("nf4", "fp4", "int8", "bf16", "fp16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
LOOPS = ("plain", "trainer")
"""What the training loop keeps of the model's outputs: ``plain`` is the loop of the tutorials
(``outputs = model(**batch); outputs.loss.backward()``), whose logits stay alive through backward and into the
next step's forward pass; ``trainer`` drops the outputs before backward, as transformers' ``Trainer`` does."""
CHECKPOINTING = ("reentrant", "non-reentrant")
"""Gradient checkpointing's variants: ``reentrant`` is what ``prepare_model_for_kbit_training`` gives with
peft's defaults (it passes no ``use_reentrant``, and ``torch.utils.checkpoint`` then defaults to True);
``non-reentrant`` is transformers' own default and what ``use_reentrant=False`` asks for."""


@dataclass(frozen=True)
class Recipe:
    """One training setup to predict: the model (a preset or a config file), quantization, LoRA, the batch."""

    arch: str = "llama"
    size: str | None = "8b"
    config: Path | None = None  # a local config.json (or a directory holding one) instead of a preset
    quant: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    lora_r: int = 16
    lora_targets: str | tuple[str, ...] = "all-linear"
    batch: int = 1
    seq: int = 2048
    gradient_checkpointing: bool = False
    checkpointing: str = "reentrant"  # the variant, where gradient checkpointing is on: see CHECKPOINTING
    optimizer: str = "adamw"
    autocast: str | None = None
    accumulation: int = 1
    loop: str = "plain"  # see LOOPS
    use_cache: bool | None = None  # model.config.use_cache; None: the config's own (see uses_cache)

    def describe(self) -> str:
        model = str(self.config) if self.config else f"{self.arch} {self.size}"
        targets = self.lora_targets if isinstance(self.lora_targets, str) else ",".join(self.lora_targets)
        checkpointing = f"{self.checkpointing} checkpointing" if self.gradient_checkpointing else "no checkpointing"
        return (
            f"{model}, {self.quant}{' + double quant' if self.double_quant and self.quant in ('nf4', 'fp4') else ''}, "
            f"LoRA r{self.lora_r} {targets}, batch {self.batch} x seq {self.seq}, {checkpointing}, "
            f"{self.optimizer}, {self.loop} loop" + (f", autocast {self.autocast}" if self.autocast else "")
        )

    def assumptions(self, config: Any = None, in_effect: str | None = None) -> list[str]:
        """What the estimate takes the user's stack to do, one line each (``config``: the model's, to say
        whether its embeddings are tied; ``in_effect``: the checkpointing variant read from the built model)."""
        quantized = self.quant in ("nf4", "fp4", "int8")
        load = (
            f"from_pretrained with a BitsAndBytesConfig ({self.quant}, compute {self.compute_dtype}), then "
            "prepare_model_for_kbit_training: every parameter left unquantized upcast to float32"
            if quantized
            else f"from_pretrained in {self.quant}"
        )
        if config is not None:
            tied = bool(getattr(config, "tie_word_embeddings", False))
            load += "; input and output embeddings tied (one float32 matrix)" if tied else "; embeddings untied"
        if not self.gradient_checkpointing:
            checkpointing = "gradient checkpointing: off"
        elif self.checkpointing == "reentrant":
            checkpointing = (
                "gradient checkpointing: reentrant (prepare_model_for_kbit_training with peft's defaults), "
                "the input embeddings' output requiring grad"
            )
        else:
            checkpointing = (
                'gradient checkpointing: non-reentrant (gradient_checkpointing_kwargs={"use_reentrant": False}), '
                "the input embeddings' output requiring grad"
            )
        if in_effect is not None:
            checkpointing += f"; read from the built model: {in_effect}"
        cache = self.use_cache if self.use_cache is not None else bool(getattr(config, "use_cache", False))
        if not cache:
            kv = "KV cache: off (model.config.use_cache = False)"
        elif self.gradient_checkpointing:
            kv = "KV cache: on in the config, but gradient checkpointing turns it off in training"
        else:
            kv = (
                "KV cache: on (model.config.use_cache, as the config leaves it): the forward pass copies every "
                "layer's keys and values into a DynamicCache, which the outputs hold"
            )
        loop = (
            "loop: outputs = model(input_ids, labels=...); outputs.loss.backward(); optimizer.step(); "
            "optimizer.zero_grad(): the outputs' float32 logits alive through backward and the next forward"
            if self.loop == "plain"
            else "loop: transformers' Trainer, the outputs dropped before backward"
        )
        return [
            load,
            f"LoRA r{self.lora_r}, alpha {2 * self.lora_r}, no dropout, on {self.lora_targets}",
            checkpointing,
            kv,
            "loss: transformers' ForCausalLMLoss over every position (float32 logits)",
            loop,
            f"{self.optimizer}, its state made by a warm-up step; the second step is the one estimated",
            "PyTorch's CUDA caching allocator with its default settings (no PYTORCH_CUDA_ALLOC_CONF)",
        ]


@dataclass
class Estimate:
    """A predicted training step: bytes on the target GPU and where they go.

    ``peak``: the allocator's allocated peak over the measured step (everything resident included, and the
    cuBLAS workspaces); ``reserved`` and ``device``: the modelled reservation and NVML use at that peak;
    ``resident``: allocated before the step (the prepared model, and from the warm-up step the optimizer
    state). ``method`` is ``fake`` (the recipe ran on fake tensors) or ``analytic`` (the layer model, with
    ``reason`` saying why the fake run was not possible).
    """

    recipe: Recipe
    gpu: Gpu
    peak: int
    reserved: int
    device: int
    resident: int
    attribution: Attribution | None
    method: str = "fake"
    reason: str = ""
    seconds: float = 0.0
    levers: list[Lever] = field(default_factory=list)
    recommended: list[str] = field(default_factory=list)
    findings: list[str] = field(default_factory=list)
    assumed: list[str] = field(default_factory=list)  # the recipe's assumptions (Recipe.assumptions)

    @property
    def fits(self) -> bool:
        """Whether the device use (the context included) stays within the GPU's memory."""
        return self.device <= self.gpu.memory

    @property
    def needed(self) -> int:
        """Bytes to give back for the step to fit (0 where it fits)."""
        return max(0, self.device - self.gpu.memory)

    def to_dict(self) -> dict[str, Any]:
        recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.recipe.__dict__.items()}
        return {
            "recipe": recipe,
            "assumed": self.assumed,
            "gpu": {
                "name": self.gpu.name,
                "memory_bytes": self.gpu.memory,
                "workspace_bytes": self.gpu.workspace,
                "context_bytes": self.gpu.context,
                "measured": list(self.gpu.measured),
                "assumed": list(self.gpu.assumed),
                "provenance": self.gpu.provenance(),
            },
            "method": self.method,
            "reason": self.reason,
            "peak_bytes": self.peak,
            "reserved_bytes": self.reserved,
            "reserved_is": "modelled" if self.method == "fake" else "formula",
            "device_bytes": self.device,
            "resident_bytes": self.resident,
            "attribution": self.attribution.to_dict() if self.attribution else None,
            "fits": self.fits,
            "needed_bytes": self.needed,
            "findings": self.findings,
            "levers": [lever.to_dict() for lever in self.levers],
            "recommended": self.recommended,
            "seconds": round(self.seconds, 2),
        }


# -- the model, on fake tensors


def model_config(recipe: Recipe) -> Any:
    """The transformers config of the recipe's model: a preset's, or a local config file's."""
    from transformers import AutoConfig

    if recipe.config is not None:
        path = Path(recipe.config)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise BadValue(f"--arch: {str(recipe.config)!r} is neither a preset architecture nor a config file")
        try:
            config = AutoConfig.from_pretrained(path)
        except (OSError, ValueError, KeyError) as exc:
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise BadValue(f"--arch {path}: not a transformers config ({text})") from None
    else:
        try:
            shape = presets.preset(recipe.arch, recipe.size or "")
        except ValueError as exc:
            raise BadValue(str(exc).replace("quantized_model: ", "--arch/--size: ")) from None
        config = AutoConfig.for_model(recipe.arch, **shape.config)
    return config


def uses_cache(recipe: Recipe, config: Any) -> bool:
    """Whether the model fills a KV cache in training: the recipe's choice, else the config's own
    ``use_cache`` (true in most, and ``from_pretrained`` leaves it so)."""
    return bool(getattr(config, "use_cache", False)) if recipe.use_cache is None else recipe.use_cache


def _skip(name: str, config: Any) -> bool:
    """Modules transformers leaves unquantized: the output embeddings (and anything tied to the input ones)."""
    return name.split(".")[-1] in ("lm_head", "embed_out", "output") or name in (
        getattr(config, "quantization_skip", None) or ()
    )


def quantize(model: Any, quant: str, double_quant: bool, compute_dtype: str) -> int:
    """Replace ``model``'s linear layers (all but the output head) by bitsandbytes layers with quantized weights,
    as ``from_pretrained`` with a ``BitsAndBytesConfig`` does; returns how many were replaced."""
    import bitsandbytes as bnb
    import torch

    dtype = getattr(torch, compute_dtype)
    replaced = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if type(child) is not torch.nn.Linear or _skip(full, model.config):
                continue
            shape = (child.out_features, child.in_features)
            bias = child.bias is not None
            layer: Any
            weight: Any
            if quant in ("nf4", "fp4"):
                layer = bnb.nn.Linear4bit(
                    child.in_features,
                    child.out_features,
                    bias=bias,
                    compute_dtype=dtype,
                    compress_statistics=double_quant,
                    quant_type=quant,
                    device="meta",
                )
                weight = bnb.nn.Params4bit(
                    torch.empty(shape, dtype=torch.float16 if dtype == torch.float32 else dtype, device="meta"),
                    requires_grad=False,
                    quant_type=quant,
                    compress_statistics=double_quant,
                    module=layer,
                )
                layer.weight = weight._quantize(torch.device("meta"))
            else:
                layer = bnb.nn.Linear8bitLt(
                    child.in_features,
                    child.out_features,
                    bias=bias,
                    has_fp16_weights=False,
                    threshold=6.0,
                    device="meta",
                )
                weight = bnb.nn.Int8Params(
                    torch.empty(shape, dtype=torch.float16, device="meta"), requires_grad=False, has_fp16_weights=False
                )
                layer.weight = weight._quantize(torch.device("meta"))
            if bias:
                layer.bias = torch.nn.Parameter(child.bias.to(dtype), requires_grad=False)
            setattr(module, child_name, layer)
            replaced += 1

    forget_meta_caches()
    flag = "is_loaded_in_4bit" if quant in ("nf4", "fp4") else "is_loaded_in_8bit"
    with contextlib.suppress(AttributeError):  # a read-only property in some transformers versions
        setattr(model, flag, True)
    model.config.use_cache = False
    return replaced


def fake_model(config: Any, quant: str, double_quant: bool = True, compute_dtype: str = "bfloat16") -> Any:
    """A causal LM of ``config`` on the meta device, loaded as ``loading.load`` would load it: ``quant`` one of
    :data:`QUANTS` (bf16/fp16/fp32: unquantized in that dtype; else in ``compute_dtype`` and quantized)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(quant, compute_dtype)
    # from_pretrained never holds the whole model in 16 bits: it loads and quantizes one weight at a time. So
    # the skeleton is built where the estimate does not count it; quantize() counts each weight's 16-bit
    # transient and what it keeps, and what stays unquantized is counted once quantization is done.
    tracker = active_tracker()
    with torch.device("meta"), warnings.catch_warnings(), untracked():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    if quant in ("nf4", "fp4", "int8"):
        quantize(model, quant, double_quant, compute_dtype)
    if tracker is not None:
        tracker.adopt([*model.parameters(), *model.buffers()])
    model.config.use_cache = False
    return model


# -- running the recipe


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The libraries warn about things that are true of every fake run (no CUDA, meta tensors)."""
    import logging

    loggers = [logging.getLogger(name) for name in ("transformers", "peft", "bitsandbytes")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _check(recipe: Recipe) -> None:
    for name in ("lora_r", "batch", "seq", "accumulation"):
        value = getattr(recipe, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise BadValue(f"--{name.replace('_', '-')}: must be a positive integer, got {value!r}")
    if recipe.quant not in QUANTS:
        raise BadValue(f"--quant: unknown quantization {recipe.quant!r}; choose one of {', '.join(QUANTS)}")
    if recipe.optimizer not in OPTIMIZERS:
        raise BadValue(f"--optimizer: unknown optimizer {recipe.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    if recipe.loop not in LOOPS:
        raise BadValue(f"--loop: unknown training loop {recipe.loop!r}; choose one of {', '.join(LOOPS)}")
    if recipe.checkpointing not in CHECKPOINTING:
        choices = ", ".join(CHECKPOINTING)
        raise BadValue(f"--checkpointing-variant: unknown variant {recipe.checkpointing!r}; choose one of {choices}")


def checkpointing_kwargs(recipe: Recipe) -> dict[str, bool]:
    """What the recipe passes as ``gradient_checkpointing_kwargs``: its variant, said explicitly (peft's
    default, none, reaches ``torch.utils.checkpoint`` as ``use_reentrant=True``)."""
    return {"use_reentrant": recipe.checkpointing == "reentrant"}


def _build(recipe: Recipe) -> Any:
    """The recipe's model prepared as the usual QLoRA recipe prepares it: ``prepare_model_for_kbit_training``
    (float32 upcast of every parameter left unquantized; with checkpointing, its variant and the hook that
    makes the input embeddings' output require grad), then peft LoRA; unquantized models get checkpointing
    from transformers directly."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    config = model_config(recipe)
    use_cache = uses_cache(recipe, config)
    model = fake_model(config, recipe.quant, recipe.double_quant, recipe.compute_dtype)
    kwargs = checkpointing_kwargs(recipe)
    if loading.is_quantized(model):
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.gradient_checkpointing, gradient_checkpointing_kwargs=kwargs
        )
    elif recipe.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.enable_input_require_grads()
    targets = recipe.lora_targets if isinstance(recipe.lora_targets, str) else list(recipe.lora_targets)
    lora = LoraConfig(
        r=recipe.lora_r, lora_alpha=2 * recipe.lora_r, target_modules=targets, lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora)
    model.config.use_cache = use_cache
    return model


@dataclass
class Step:
    """The measured step of a fake run: its allocated peak (the cuBLAS workspaces included), the allocator
    model's reservation at its peak (workspaces included), what was allocated before it (the model, and the
    optimizer state from the warm-up step; without the workspaces), its attribution, and the setup the
    advisor reads."""

    peak: int
    reserved: int
    resident: int
    attribution: Attribution | None
    setup: Any
    checkpointing: str | None = None  # the variant the built model checkpoints with, read from it


MEASURED_STEP = "step2"
"""The step a fake run measures: the second, once the first has made the optimizer state resident."""


def warm_up_then_measure(
    measurement: Measurement, starting: Callable[[str], None] | None = None
) -> Callable[[str], AbstractContextManager[None]]:
    """The ``phase`` argument of a training loop (``train_steps``, :func:`plain_loop`) that records its first
    step as ``warmup`` and :data:`MEASURED_STEP` as ``call``; ``starting(name)`` runs as each step begins."""

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        if starting is not None:
            starting(name)
        with measurement.phase("call" if name == MEASURED_STEP else "warmup"):
            yield

    return phase


def run_step(recipe: Recipe, gpu: Gpu, attribute: bool = True) -> Step:
    """Build and train the recipe on the fake GPU; raises whatever the fake run raises.

    One optimizer runs a warm-up step and then the measured step, so that its state is resident when the
    measured step begins, as in a training loop. When the warm-up begins, what the build left alive is laid
    out in a fresh allocator model after the cuBLAS workspaces, as ``from_pretrained`` and
    ``prepare_model_for_kbit_training`` (which empties the cache) leave a real GPU.
    """

    meter = EstimateMeter(gpu, attribute=attribute)
    measurement = Measurement(meter)
    resident = 0

    def starting(name: str) -> None:
        nonlocal resident
        tracker = meter.fake_device
        if name == "step1":
            tracker.lay_out(gpu.workspace_blocks)
        if name == MEASURED_STEP:
            resident = tracker.current.get(DEVICE, 0)

    phase = warm_up_then_measure(measurement, starting)

    knobs = knobs_of(recipe)
    try:
        with _quiet():
            measurement.enter("setup")
            with measurement.stage("load"):
                model = _build(recipe)
            variant = introspect.checkpointing_variant(model)
            measurement.register_model(model)
            measurement.exit("setup")
            # The model keeps the checkpointing it was prepared with (train_steps would set its own variant).
            steps = training.train_steps if recipe.loop == "trainer" else plain_loop
            steps(model, **{**knobs, "gradient_checkpointing": None}, steps=2, phase=phase)
        sample = measurement.finish()
        setup = introspect.inspect_setup([model], [], knobs, measurement.probe)
    finally:
        if not measurement.finished:
            measurement.finish()
    # The fake GPU starts empty, so the call phase's peaks are the measured step's absolute peaks.
    peak = (sample.value("allocated", "call") or 0) + gpu.workspace
    # The meter's reserved is the allocator model's (workspaces included, from the lay-out) with the fitted share.
    return Step(peak, sample.value("reserved", "call") or 0, resident, sample.attribution, setup, variant)


def plain_loop(
    model: Any,
    *,
    batch: int,
    seq: int,
    steps: int,
    accumulation: int = 1,
    gradient_checkpointing: bool | None = None,
    autocast: str | None = None,
    optimizer: str = "adamw",
    phase: Callable[[str], AbstractContextManager[None]],
) -> None:
    """The loop of the tutorials, as a user writes it: ``outputs = model(...)``, ``outputs.loss.backward()``,
    ``optimizer.step()``, ``optimizer.zero_grad()``. The outputs stay referenced through backward, and the
    last ones until the next forward pass has returned, so their logits are alive at both moments. The
    arguments are :func:`pytest_gpumem.models.training.train_steps`' (``gradient_checkpointing`` is left to the
    model)."""
    import torch

    model.train()
    device = model.get_input_embeddings().weight.device
    optim = _make_optimizer(optimizer, [p for p in model.parameters() if p.requires_grad], 1e-4)
    mixed = (
        functools.partial(torch.autocast, device.type, getattr(torch, autocast)) if autocast else contextlib.nullcontext
    )
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for step in range(1, steps + 1):
        with phase(f"step{step}"):
            for _ in range(accumulation):
                input_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(device)
                with mixed():
                    outputs = model(input_ids=input_ids, labels=input_ids)
                loss = outputs.loss / accumulation
                loss.backward()
            optim.step()
            optim.zero_grad()


def knobs_of(recipe: Recipe) -> dict[str, Any]:
    """The recipe's step as ``training.train_steps`` knobs."""
    return {
        "batch": recipe.batch,
        "seq": recipe.seq,
        "accumulation": recipe.accumulation,
        "gradient_checkpointing": recipe.gradient_checkpointing,
        "autocast": recipe.autocast,
        "optimizer": recipe.optimizer,
    }


def estimate(recipe: Recipe, gpu: Gpu, advise: bool = True) -> Estimate:
    """Predict ``recipe`` on ``gpu``: run it on fake tensors (or, where that fails, the analytic model), then
    ask the advisor which levers would make it fit, each re-estimated with the lever applied."""
    _check(recipe)
    started = time.perf_counter()
    method, reason = "fake", ""
    try:
        step = run_step(recipe, gpu)
    except BadValue:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure of the fake run falls back to the labelled model
        reason = f"the fake run failed: {error_line(exc)}"[:300]
        method = "analytic"
        step = analytic(recipe, gpu)
    result = Estimate(
        recipe,
        gpu,
        step.peak,
        step.reserved,
        device_bytes(step.reserved, gpu),
        step.resident,
        step.attribution,
        method,
        reason,
        assumed=recipe.assumptions(model_config(recipe), step.checkpointing if method == "fake" else None),
    )
    if advise:
        _advise(result, step.setup)
    result.seconds = time.perf_counter() - started
    return result


def _advise(result: Estimate, setup: Any) -> None:
    """The advisor's levers for the estimate, the knobs among them re-estimated with the lever applied: by
    another fake run, or, where the estimate fell back to the analytic formula, by the formula, and every
    lever then says it came from the formula (nothing ran)."""

    found = findings.findings(setup) if setup is not None else []
    recipe, gpu = result.recipe, result.gpu

    def measure(overrides: dict[str, Any]) -> int:
        changed = with_knobs(recipe, overrides)
        if result.method == "analytic":
            return analytic(changed, gpu).peak
        return run_step(changed, gpu, attribute=False).peak

    if setup is None:
        return
    advice = advisor.advise(result.attribution, setup, found, result.needed or None, knobs_of(recipe), measure)
    for lever in advice.levers:
        if result.method == "analytic":
            lever.source = "formula"
            lever.basis = "analytic formula, nothing ran: " + lever.basis.replace(
                "re-ran the step with", "the formula with"
            )
        elif lever.source == "measured":
            lever.source = "estimated-run"
            lever.basis = lever.basis.replace("re-ran the step with", "re-ran the recipe on fake tensors with")
    result.levers = advice.levers
    result.recommended = advice.recommended
    result.findings = advice.findings


def with_knobs(recipe: Recipe, overrides: dict[str, Any]) -> Recipe:
    """The recipe with the advisor's knob overrides applied (``steps`` is the recipe's own; a checkpointing
    knob of None leaves the recipe's)."""
    fields = {k: v for k, v in overrides.items() if k in knobs_of(recipe)}
    if fields.get("gradient_checkpointing", False) is None:
        del fields["gradient_checkpointing"]
    return replace(recipe, **fields)


# -- the analytic fallback


def analytic(recipe: Recipe, gpu: Gpu) -> Step:
    """The advisor's layer model of the recipe, for models the fake run cannot take: weights from the
    parameter counts, LoRA's gradients and AdamW state, and what each decoder layer keeps for backward
    (the cuBLAS workspaces added; reserved is the peak in whole segments, with no allocator replay)."""

    config = model_config(recipe)
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    shape = Shape(
        layers=int(config.num_hidden_layers),
        hidden=hidden,
        intermediate=int(getattr(config, "intermediate_size", 4 * hidden)),
        heads=heads,
        kv_heads=int(getattr(config, "num_key_value_heads", None) or heads),
        head_dim=head_dim,
        vocab=int(config.vocab_size),
    )
    linear = shape.decoder_linear_params()
    quantized = recipe.quant in ("nf4", "fp4", "int8")
    embed = shape.vocab * hidden * (1 if getattr(config, "tie_word_embeddings", False) else 2)
    other = embed + shape.layers * 2 * hidden + hidden
    lora = sum(lora_tensor_sizes(shape, recipe.lora_r, LINEAR_NAMES))
    if recipe.quant in ("nf4", "fp4"):
        weights = nf4_bytes(linear, recipe.double_quant) + other * 4 + lora * 4
    elif recipe.quant == "int8":
        weights = linear + 4 * linear // hidden + other * 4 + lora * 4
    else:
        width = {"bf16": 2, "fp16": 2, "fp32": 4}[recipe.quant]
        weights = (linear + other) * width + lora * 4
    gradients = lora * 4
    optimizer = lora * 8 if recipe.optimizer == "adamw" else lora * 2
    hidden_bytes = 4 if quantized else {"bf16": 2, "fp16": 2, "fp32": 4}.get(recipe.quant, 2)
    precision = Precision(
        hidden=hidden_bytes,
        weight=hidden_bytes,
        adapter=4,
        quantized=quantized,
        lora_r=recipe.lora_r,
        lora_targets=LINEAR_NAMES,
    )
    per_layer = layer_bytes(shape, precision, "sdpa", "cuda")
    tokens = recipe.batch * recipe.seq
    if recipe.gradient_checkpointing:
        layers = checkpoint_bytes(shape, tokens, hidden_bytes) + per_layer.total(tokens, recipe.seq)
    else:
        layers = shape.layers * per_layer.total(tokens, recipe.seq)
    # float32 logits, their log-softmax and its gradient, and in the plain loop the logits the outputs hold
    logits = (4 if recipe.loop == "plain" else 3) * tokens * shape.vocab * 4
    # Without checkpointing a KV cache holds a copy of every layer's keys and values; the plain loop's outputs
    # keep it through backward.
    cached = uses_cache(recipe, config) and not recipe.gradient_checkpointing and recipe.loop == "plain"
    cache = 2 * shape.layers * tokens * shape.kv_heads * head_dim * hidden_bytes if cached else 0
    activations = int(layers + logits + cache)
    peak = weights + gradients + optimizer + activations
    attribution = Attribution(
        peak=Breakdown(weights, gradients, optimizer, activations, int(layers)), device="cuda:0", stage="backward"
    )
    setup = TrainingSetup(
        arch=getattr(config, "model_type", None),
        num_layers=shape.layers,
        hidden_size=hidden,
        intermediate_size=shape.intermediate,
        vocab_size=shape.vocab,
        num_heads=heads,
        num_kv_heads=shape.kv_heads,
        head_dim=head_dim,
        attention="sdpa",
        training=True,
        use_cache=False,
        gradient_checkpointing=recipe.gradient_checkpointing,
        checkpointing_effective=recipe.gradient_checkpointing,
        quant=recipe.quant if quantized else None,
        lora_r=recipe.lora_r,
        lora_targets=list(LINEAR_NAMES),
        lora_modules=7 * shape.layers,
        lora_params=lora,
        total_params=linear + other + lora,
        trainable_params=lora,
        trainable_bytes=lora * 4,
        optimizer="AdamW" if recipe.optimizer == "adamw" else "AdamW8bit",
        batch=recipe.batch,
        seq=recipe.seq,
        hidden_dtype="float32" if hidden_bytes == 4 else "bfloat16",
        weight_dtype="float32" if quantized else "bfloat16",
    )
    peak = int(peak) + gpu.workspace
    return Step(peak, reserved_bytes(whole_segments(peak), peak), int(weights), attribution, setup)
