"""The advisor: which lever would give a test's memory back, what each saves, and which to pull first.

The levers are those of :data:`~pytest_gpumem.core.sample.LEVERS`, in the order of
their cost to quality: fixing a setting that does nothing or costs memory
(free), a smaller per-device batch with gradient accumulation, gradient
checkpointing, a shorter ``max_seq_length``, bf16 mixed precision, LoRA
instead of full fine-tuning, 4-bit QLoRA, a lower LoRA rank, an 8-bit
optimizer.

Each lever's saving is first *estimated* from the attribution (bytes per
consumer at the peak and at the highest moment of each stage): a lever is an
:class:`Effect` on the consumers (half the activations, a tenth of the
gradients, ...), applied to every stage; the new peak is the highest stage
after it, and the saving is the old peak less the new one. Where the
attribution alone cannot say how a consumer changes (what bf16 autocast does to
activations that are partly float32, what 4-bit weights cost in upcast
norms), a model of what one decoder layer keeps for backward, built from the
:class:`~pytest_gpumem.measure.introspect.TrainingSetup`, gives the ratio; the
attribution gives the bytes it applies to. Where the test registered a
training step, the levers that are knobs of that step are then *measured*:
the step runs again with the knob turned (see :mod:`pytest_gpumem.advise.whatif`),
and the estimate is kept beside the measurement.

The recommendation is the combination of levers with the lowest highest cost
to quality that frees what the test needs, preferring fewer levers; levers
that save nothing or cost memory are reported and never recommended.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pytest_gpumem.advise.memory_model import (
    LINEAR_NAMES,
    MIN_8BIT_SIZE,
    LayerBytes,
    Precision,
    Shape,
    adam_8bit_bytes,
    attention_kernel,
    checkpoint_bytes,
    final_norm_copy,
    frozen_base_frees,
    layer_bytes,
    lora_tensor_sizes,
    nf4_bytes,
    nf4_linear_bytes,
    parameter_sizes,
)
from pytest_gpumem.advise.whatif import MissingKnob
from pytest_gpumem.core.sample import LEVERS, Advice, Attribution, Breakdown, Lever
from pytest_gpumem.core.units import error_line, format_bytes
from pytest_gpumem.measure.introspect import TrainingSetup, dtype_bytes

HALF = ("bfloat16", "float16")
LORA_R = 16
"""The LoRA rank the LoRA and QLoRA levers propose (on all linear layers), as QLoRA recipes do."""


class FindingLike(Protocol):
    """A :class:`~pytest_gpumem.measure.introspect.Finding`: a setting that does nothing or costs memory."""

    key: str
    message: str


# -- the model's shape, and what one decoder layer keeps for backward


# -- effects, and the peak they leave


@dataclass(frozen=True)
class Effect:
    """How a lever changes the consumers at any moment: factors on each, bytes added to the activations
    outside the decoder layers (in forward and backward), and whether gradients stay alive through
    forward and backward (gradient accumulation: from the second micro-batch on).

    ``recompute`` (gradient checkpointing) adds a moment of its own: backward recomputing one layer, when
    the layers hold their checkpoints plus that layer's activations (this share of all the layers'
    activations) and the loss's tensors are gone. ``layer_cap`` bounds the layers' activations at any moment
    (the KV cache gone: their highest less the cache; moments after the cache died stay as they were).
    """

    weights: float = 1.0
    gradients: float = 1.0
    optimizer: float = 1.0
    layer: float = 1.0
    other: float = 1.0
    other_add: int = 0
    accumulate: bool = False
    trainable: float = 1.0  # the share of trainable parameters kept; combines by min (LoRA, QLoRA)
    recompute: float = 0.0
    layer_cap: float | None = None

    def then(self, other: Effect) -> Effect:
        """Both effects: factors multiply (halving the batch, then the sequence, leaves a quarter of the
        activations); the share of trainable parameters is the smaller one (both mean LoRA)."""
        return Effect(
            weights=self.weights * other.weights,
            gradients=self.gradients * other.gradients,
            optimizer=self.optimizer * other.optimizer,
            layer=self.layer * other.layer,
            other=self.other * other.other,
            other_add=self.other_add + other.other_add,
            accumulate=self.accumulate or other.accumulate,
            trainable=min(self.trainable, other.trainable),
            recompute=self.recompute * other.layer + other.recompute * self.layer,
            layer_cap=min(
                (
                    cap
                    for cap in (_scaled(self.layer_cap, other.layer), _scaled(other.layer_cap, self.layer))
                    if cap is not None
                ),
                default=None,
            ),
        )

    def on(self, breakdown: Breakdown, stage: str, full_gradients: int) -> Breakdown:
        """The consumers of ``breakdown`` (taken in ``stage``) with this effect."""
        passes = stage in ("forward", "backward", "")
        layer = breakdown.layer_activations * self.layer
        if self.layer_cap is not None:
            layer = min(layer, self.layer_cap)
        other = (breakdown.activations - breakdown.layer_activations) * self.other
        if passes:
            other = max(0.0, other + self.other_add)
        gradients = breakdown.gradients * self.gradients * self.trainable
        if self.accumulate and passes:
            gradients = max(gradients, full_gradients * self.gradients * self.trainable)
        return Breakdown(
            weights=round(breakdown.weights * self.weights),
            gradients=round(gradients),
            optimizer=round(breakdown.optimizer * self.optimizer * self.trainable),
            activations=round(layer + other),
            layer_activations=round(layer),
        )


def _scaled(cap: float | None, factor: float) -> float | None:
    return None if cap is None else cap * factor


NO_EFFECT = Effect()


@dataclass
class Situation:
    """The peak to act on: its breakdown, each stage's, and the facts the levers' estimates need."""

    peak: Breakdown
    stage: str
    stages: dict[str, Breakdown]
    setup: TrainingSetup
    knobs: dict[str, Any]
    shape: Shape | None
    precision: Precision
    device: str
    modelled: bool = False  # the breakdown is modelled from the setup: no attribution was taken

    @property
    def batch(self) -> int | None:
        value = self.knobs.get("batch", self.setup.batch)
        return value if isinstance(value, int) and value > 0 else None

    @property
    def seq(self) -> int | None:
        value = self.knobs.get("seq", self.setup.seq)
        return value if isinstance(value, int) and value > 0 else None

    @property
    def tokens(self) -> int | None:
        return self.batch * self.seq if self.batch and self.seq else None

    def _moments(self) -> list[tuple[str, Breakdown]]:
        return [(self.stage, self.peak), *self.stages.items()]

    def most(self, consumer: str) -> int:
        """The most bytes ``consumer`` held at any of the recorded moments."""
        return max(getattr(b, consumer) for _, b in self._moments())

    @property
    def activations(self) -> int:
        return self.peak.activations

    @property
    def layer_activations(self) -> int:
        return self.most("layer_activations")

    def new_peak(self, effect: Effect) -> int:
        """The peak with ``effect``: the highest of the recorded moments after it (and of the moment it
        adds, where it recomputes layers in backward)."""
        gradients = self.most("gradients")
        peak = max(effect.on(b, stage, gradients).total for stage, b in self._moments())
        if effect.recompute:
            during = effect.on(self.stages.get("backward", self.peak), "backward", gradients)
            layers = self.layer_activations * (effect.layer + effect.recompute)
            peak = max(peak, during.weights + during.gradients + during.optimizer + round(layers))
        return peak

    def saving(self, effect: Effect) -> int:
        return self.peak.total - self.new_peak(effect)

    @property
    def checkpointed(self) -> bool:
        """Gradient checkpointing is on and recomputes: the layers hold checkpoints, and one layer at most."""
        enabled = self.knobs.get("gradient_checkpointing")
        if enabled is None:
            enabled = self.setup.gradient_checkpointing
        return bool(enabled) and self.setup.checkpointing_effective is not False

    @property
    def checkpoints(self) -> int:
        """The bytes of checkpoints in the layer activations (0 without checkpointing)."""
        if not self.checkpointed or self.shape is None or not self.tokens:
            return 0
        return min(self.layer_activations, checkpoint_bytes(self.shape, self.tokens, self.precision.hidden))

    def layer_factor(self, ratio: float, checkpoints: float = 1.0) -> float:
        """The factor on the layer activations when what a layer keeps changes by ``ratio``: on all of them,
        or with checkpointing on the recomputed layer's, beside checkpoints that change by ``checkpoints``
        (they are hidden states: they scale with the tokens and the hidden dtype alone)."""
        full = self.layer_activations
        if not full:
            return ratio
        kept = self.checkpoints
        return (kept * checkpoints + (full - kept) * ratio) / full

    def layer_model(self, precision: Precision | None = None) -> LayerBytes | None:
        if self.shape is None:
            return None
        return layer_bytes(self.shape, precision or self.precision, self.setup.attention, self.device)


def situation(attribution: Attribution | None, setup: TrainingSetup, knobs: dict[str, Any]) -> Situation | None:
    """The situation of a test: from its attribution, else modelled from its setup (None where neither
    can say anything)."""
    shape = Shape.of(setup)
    precision = Precision.of(setup, knobs)
    if attribution is not None:
        device = attribution.device.split(":")[0] or "cuda"
        return Situation(
            attribution.peak, attribution.stage, dict(attribution.stages), setup, knobs, shape, precision, device
        )
    modelled = modelled_peak(setup, knobs, shape, precision)
    if modelled is None:
        return None
    return Situation(modelled, "backward", {}, setup, knobs, shape, precision, "cuda", modelled=True)


def modelled_peak(
    setup: TrainingSetup, knobs: dict[str, Any], shape: Shape | None, precision: Precision
) -> Breakdown | None:
    """A peak modelled from the setup alone, at the start of backward in a later step: the weights, the
    optimizer state, every layer's activations (:func:`layer_bytes`), and outside the layers the embeddings'
    output and three float32 logits-sized tensors (the loss's log-softmax, its gradient and the logits')."""
    batch, seq = knobs.get("batch", setup.batch), knobs.get("seq", setup.seq)
    if shape is None or not batch or not seq:
        return None
    tokens = batch * seq
    checkpointed = bool(setup.gradient_checkpointing) and setup.checkpointing_effective is not False
    per_layer = layer_bytes(shape, precision, setup.attention, "cuda").total(tokens, seq)
    layers = checkpoint_bytes(shape, tokens, precision.hidden) + per_layer if checkpointed else per_layer * shape.layers
    other = tokens * shape.hidden * precision.hidden + 3 * tokens * shape.vocab * 4
    optimizer = setup.optimizer_state_bytes
    if optimizer is None:
        optimizer = 8 * setup.trainable_params if "8bit" not in (setup.optimizer or "") else 2 * setup.trainable_params
    return Breakdown(
        weights=setup.weight_bytes,
        gradients=0,
        optimizer=optimizer,
        activations=round(layers + other),
        layer_activations=round(layers),
    )


# -- the levers


@dataclass
class Candidate:
    """A lever before it is measured: its effect (None where it cannot be estimated), the knobs to turn to
    measure it (None: not a knob of the step), and how the estimate was made."""

    key: str
    action: str
    effect: Effect | None
    basis: str
    overrides: dict[str, Any] | None = None
    estimate: int | None = None
    measured: int | None = None
    note: str = ""  # why it could not be measured
    runs: str = ""  # how it was measured

    @property
    def saving(self) -> int | None:
        return self.measured if self.measured is not None else self.estimate


def _fmt(n: float) -> str:
    return format_bytes(round(n))


def _knob_text(overrides: dict[str, Any]) -> str:
    return ", ".join(f"{name.replace('_', ' ')} {value}" for name, value in overrides.items())


def checkpointing_effect(s: Situation) -> tuple[Effect, str] | None:
    """Gradient checkpointing: the layers keep only their input hidden states through the forward pass and
    the loss; backward then recomputes one layer at a time, when the loss's tensors are gone, so that the
    layers hold their checkpoints plus one layer's activations."""
    if s.shape is None or not s.tokens or not s.layer_activations:
        return None
    full = s.layer_activations
    kept = min(full, checkpoint_bytes(s.shape, s.tokens, s.precision.hidden))
    one = full / s.shape.layers
    basis = (
        f"layer activations {_fmt(full)} -> {s.shape.layers} checkpoints of {_fmt(kept / s.shape.layers)}, "
        f"plus one layer recomputed ({_fmt(one)}) in backward"
    )
    return Effect(layer=kept / full, recompute=1 / s.shape.layers), basis


def _fix_levers(s: Situation | None, findings: list[FindingLike], knobs: dict[str, Any]) -> list[Candidate]:
    """Findings that can be fixed at no cost to quality, as levers with what fixing them saves."""
    levers: list[Candidate] = []
    keys = {f.key for f in findings}
    if "checkpointing_eval" in keys or "checkpointing_ineffective" in keys:
        found = checkpointing_effect(s) if s else None
        if "checkpointing_eval" in keys:
            action, overrides = "call model.train() before the step (checkpointing recomputes only in train mode)", None
        else:
            action = "enable checkpointing with model.gradient_checkpointing_enable() so that layers recompute"
            overrides = None if knobs.get("gradient_checkpointing") is True else {"gradient_checkpointing": True}
        levers.append(
            Candidate("fix", action, found[0] if found else None, found[1] if found else "", overrides=overrides)
        )
    if "use_cache" in keys:
        levers.append(_use_cache_fix(s))
    if "bf16_not_applied" in keys:
        found_bf16 = bf16_effect(s) if s else None
        dtype = knobs.get("autocast") if knobs.get("autocast") in HALF else "bfloat16"
        levers.append(
            Candidate(
                "fix",
                f"run the forward pass under torch.autocast(dtype=torch.{dtype}) as requested",
                found_bf16[0] if found_bf16 else None,
                found_bf16[1] if found_bf16 else "",
                overrides={"autocast": dtype},
            )
        )
    if "quant_incomplete" in keys:
        levers.append(_quant_incomplete_fix(s))
    if "inference_with_grad" in keys:
        levers.append(_inference_mode_fix(s))
    if "fp32_weights" in keys:
        levers.append(_half_weights_fix(s))
    return levers


def _inference_mode_fix(s: Situation | None) -> Candidate:
    """A forward with autograd on and no backward: under ``torch.inference_mode()`` a decoder layer's
    activations are freed as the next layer runs, so of the layers' activations one layer's stay."""
    action = "run the forward under torch.inference_mode() (nothing calls backward)"
    if s is None or s.shape is None or not s.layer_activations:
        return Candidate("fix", action, None, "")
    layers = s.shape.layers
    return Candidate(
        "fix",
        action,
        Effect(layer=1 / layers),
        f"layer activations {_fmt(s.layer_activations)} kept for backward; 1 of {layers} layers' at a time",
    )


def _half_weights_fix(s: Situation | None) -> Candidate:
    """Weights loaded in float32 where the config names a half dtype: loading them in it halves them (LoRA's
    adapters stay float32), and the hidden states run in it."""
    setup = s.setup if s else None
    dtype = setup.config_dtype if setup else None
    action = f"load the model in {dtype} (from_pretrained(..., dtype=torch.{dtype}))"
    if s is None or setup is None or not s.peak.weights or not setup.weight_bytes:
        return Candidate("fix", action, None, "")
    base = max(0, min(s.peak.weights, setup.weight_bytes) - setup.lora_params * (s.precision.adapter or 4))
    factor = max(0.0, 1 - base / 2 / s.peak.weights)
    basis = f"float32 weights {_fmt(base)} halve"
    half = replace(s.precision, hidden=2, weight=2)
    before, after = s.layer_model(), s.layer_model(half)
    if before is None or after is None or s.shape is None or not s.tokens or not s.seq or s.precision.hidden != 4:
        return Candidate("fix", action, Effect(weights=factor), basis)
    layer = s.layer_factor(after.total(s.tokens, s.seq) / before.total(s.tokens, s.seq), checkpoints=0.5)
    outside = final_norm_copy(s.shape, s.tokens, 2)
    basis += f"; layer activations x {layer:.2f} in {dtype}"
    return Candidate("fix", action, Effect(weights=factor, layer=layer, other_add=outside), basis)


def _use_cache_fix(s: Situation | None) -> Candidate:
    """use_cache=True in training: the KV cache (concatenated copies of every layer's keys and values) lives
    as long as the model's output, through the loss at least, and until backward where the output is kept.
    Where a fused attention kernel keeps those very tensors for backward, it costs nothing."""
    action = "set model.config.use_cache = False for training"
    if s is None or s.shape is None or not s.tokens:
        return Candidate("fix", action, None, "")
    p = s.precision
    # RoPE promotes keys to the hidden dtype; values come out of the projection in the same dtype where
    # they matter here (a float32 residual stream)
    cache = 2 * s.shape.layers * s.tokens * s.shape.kv_width * p.hidden
    kernel = attention_kernel(
        s.setup.attention, p.autocast or p.hidden, s.shape.kv_heads < s.shape.heads, s.device, s.shape.head_dim
    )
    if kernel == "fused" and not p.autocast:
        return Candidate(
            "fix", action, Effect(), f"KV cache {_fmt(cache)}: the same tensors the {kernel} attention keeps anyway"
        )
    cap = max(0, s.layer_activations - cache)
    return Candidate("fix", action, Effect(layer_cap=cap), f"KV cache {_fmt(cache)} kept with the model's output")


def _quant_incomplete_fix(s: Situation | None) -> Candidate:
    """Linear layers left unquantized by a 4/8-bit config: quantizing them as intended (the same share of the
    decoder's linear weights as of its linear layers) brings their weights to the quantized size."""
    action = "quantize the decoder linear layers left unquantized (check llm_int8_skip_modules / target modules)"
    setup = s.setup if s else None
    if s is None or setup is None or s.shape is None or not setup.linear_layers or not s.peak.weights:
        return Candidate("fix", action, None, "")
    left = setup.linear_layers - setup.quantized_layers
    params = s.shape.decoder_linear_params() * left / setup.linear_layers
    width = dtype_bytes(setup.compute_dtype or setup.weight_dtype) or 2
    quantized = params * (1 if setup.quant == "int8" else nf4_bytes(1024, bool(setup.double_quant)) / 1024)
    freed = params * width - quantized
    factor = max(0.0, 1 - freed / s.peak.weights)
    return Candidate(
        "fix", action, Effect(weights=factor), f"{left} of {setup.linear_layers} linear layers, {_fmt(params * width)}"
    )


def _batch_lever(s: Situation | None, knobs: dict[str, Any]) -> Candidate | None:
    """A per-device batch divided by its smallest prime factor, with accumulation multiplied by it: the same
    effective batch. Activations scale with the batch; gradients stay alive across micro-batches."""
    batch = knobs.get("batch", s.setup.batch if s else None)
    if not isinstance(batch, int) or batch < 2:
        return None
    factor = next(d for d in range(2, batch + 1) if batch % d == 0)
    accumulation = knobs.get("accumulation") or 1
    inference = s is not None and s.setup.inference
    if inference:  # nothing to accumulate: the inputs run in smaller batches
        action = f"batch {batch} -> {batch // factor} (run the inputs in {factor} smaller batches)"
    else:
        action = (
            f"per-device batch {batch} -> {batch // factor} with gradient accumulation x{factor} "
            f"(effective batch {batch * accumulation} kept)"
        )
    overrides = {"batch": batch // factor, "accumulation": accumulation * factor}
    if "batch" not in knobs:
        overrides = {}  # the step's own default batch is not the one seen: a what-if would compare the wrong runs
    if s is None:
        return Candidate("batch", action, None, "", overrides=overrides or None)
    model = s.layer_model()
    fixed = model.fixed_share(s.tokens, s.seq or 1) if model and s.tokens else 0.0  # cast weights stay
    layer = s.layer_factor(fixed + (1 - fixed) / factor, checkpoints=1 / factor)
    effect = Effect(layer=layer, other=1 / factor, accumulate=not inference)
    basis = f"activations {_fmt(s.activations)} at the peak scale with the batch: 1/{factor} of them"
    gradients = s.most("gradients")
    if gradients > s.peak.gradients and gradients >= 2**20:
        basis += f"; gradients {_fmt(gradients)} stay alive between micro-batches"
    return Candidate("batch", action, effect, basis, overrides=overrides or None)


def _checkpointing_lever(s: Situation | None, knobs: dict[str, Any], fixed: bool) -> Candidate | None:
    setup = s.setup if s else None
    enabled = knobs.get("gradient_checkpointing")
    if enabled is None and setup is not None:
        enabled = setup.gradient_checkpointing
    effective = enabled and (setup is None or setup.checkpointing_effective is not False)
    if effective or fixed:
        return None
    action = "enable gradient checkpointing (model.gradient_checkpointing_enable())"
    found = checkpointing_effect(s) if s else None
    if found is None:
        return Candidate("checkpointing", action, None, "", overrides={"gradient_checkpointing": True})
    return Candidate("checkpointing", action, found[0], found[1], overrides={"gradient_checkpointing": True})


def _seq_lever(s: Situation | None, knobs: dict[str, Any]) -> Candidate | None:
    """Half the sequence length: activations are linear in it, except the attention probabilities that math
    and eager attention keep, which are quadratic (a quarter)."""
    seq = knobs.get("seq", s.setup.seq if s else None)
    if not isinstance(seq, int) or seq < 2:
        return None
    action = (
        f"max_seq_length {seq} -> {seq // 2} (pack or bucket sequences; never truncate completions or drop hard "
        "examples)"
    )
    overrides = {"seq": seq // 2} if "seq" in knobs else None
    if s is None:
        return Candidate("seq", action, None, "", overrides=overrides)
    model = s.layer_model()
    tokens = s.tokens or seq
    quadratic = model.quadratic_share(tokens, seq) if model else 0.0
    fixed = model.fixed_share(tokens, seq) if model else 0.0
    layer = s.layer_factor(fixed + 0.5 * (1 - fixed - quadratic) + 0.25 * quadratic, checkpoints=0.5)
    basis = f"activations {_fmt(s.activations)} at the peak ~ linear in seq"
    if quadratic:
        basis += f", {quadratic:.0%} of the layers' (attention probabilities) quadratic"
    return Candidate("seq", action, Effect(layer=layer, other=0.5), basis, overrides=overrides)


def bf16_effect(s: Situation | None) -> tuple[Effect, str] | None:
    """bf16 autocast: the layers' activations change by the ratio of the layer model with and without
    autocast (matmul inputs kept in bf16, fused attention instead of math); the loss still works on float32
    logits, so the activations outside the layers stay, and a float32 lm_head is cast to bf16 once per
    forward and kept for backward (its weights frozen, autocast does not cache the cast). A trainable
    lm_head kept its input for its weight's gradient: a bf16 copy of it instead."""
    if s is None:
        return None
    p = s.precision
    with_autocast = replace(p, autocast=2)
    before, after = s.layer_model(p), s.layer_model(with_autocast)
    seq = s.seq or 1
    if before is None or after is None:
        # No shape: matmul outputs in bf16 roughly halve what is float32.
        return Effect(layer=0.5 if p.hidden == 4 else 1.0), f"layer activations {_fmt(s.layer_activations)} x 0.5"
    tokens = s.tokens or seq
    ratio = after.total(tokens, seq) / before.total(tokens, seq)
    factor = s.layer_factor(ratio)
    head = s.shape.vocab * s.shape.hidden * 2 if s.shape and p.weight != 2 else 0
    basis = f"layer activations {_fmt(s.layer_activations)} x {factor:.2f} (modelled)"
    if head:
        basis += f"; lm_head cast to bf16 kept for backward +{_fmt(head)}"
    head_input = tokens * s.shape.hidden * (p.hidden - 2) if s.shape and p.trainable_base else 0
    if head_input > 0:
        basis += f"; lm_head's input kept in bf16 -{_fmt(head_input)}"
    return Effect(layer=factor, other_add=head - max(0, head_input)), basis


def _bf16_lever(s: Situation | None, knobs: dict[str, Any], fixed: bool) -> Candidate | None:
    setup = s.setup if s else None
    if fixed or knobs.get("autocast") or (setup is not None and setup.autocast):
        return None
    float32 = setup is not None and "float32" in (setup.hidden_dtype, setup.compute_dtype, setup.weight_dtype)
    if not float32:
        return None
    action = "run the forward pass and the loss under torch.autocast(dtype=torch.bfloat16)"
    found = bf16_effect(s)
    return Candidate(
        "bf16", action, found[0] if found else None, found[1] if found else "", overrides={"autocast": "bfloat16"}
    )


def _lora_lever(s: Situation | None) -> Candidate | None:
    """LoRA r16 on all linear layers instead of full fine-tuning: the frozen parameters' gradients and
    optimizer state vanish; LoRA's own (float32) parameters, gradients and state come in."""
    if s is None or s.setup.lora_r or not s.setup.trainable_params:
        return None
    setup = s.setup
    if setup.trainable_params <= setup.total_params // 2:
        return None
    action = f"LoRA r={LORA_R} on all linear layers, base weights frozen"
    if s.shape is None:
        return Candidate("lora", action, None, "")
    lora = sum(lora_tensor_sizes(s.shape, LORA_R, LINEAR_NAMES))
    share = min(1.0, lora * 4 / max(1, setup.trainable_bytes))  # LoRA's float32 against what trains now
    added = lora * 4 / s.peak.weights if s.peak.weights else 0.0
    layer, outside = _frozen_base(s, replace(s.precision, adapter=4, lora_r=LORA_R, lora_targets=LINEAR_NAMES))
    basis = (
        f"{setup.trainable_params / 1e6:.1f}M trainable parameters -> {lora / 1e6:.1f}M: gradients "
        f"{_fmt(s.most('gradients'))} and optimizer state {_fmt(s.most('optimizer'))} x {share:.3f}; "
        f"layer activations x {layer:.2f}, {_fmt(outside)} fewer outside them (a frozen base keeps no inputs)"
    )
    return Candidate("lora", action, Effect(weights=1 + added, trainable=share, layer=layer, other_add=-outside), basis)


def _frozen_base(s: Situation, lora: Precision) -> tuple[float, int]:
    """The factor on the layers' activations and the bytes freed outside them when full fine-tuning turns
    into LoRA of precision ``lora`` (the base frozen): no longer kept for the base weights' gradients."""
    before, after = s.layer_model(), s.layer_model(replace(lora, trainable_base=False))
    if before is None or after is None or s.shape is None or not s.tokens or not s.seq:
        return 1.0, 0
    ratio = s.layer_factor(after.total(s.tokens, s.seq) / before.total(s.tokens, s.seq))
    if not s.precision.trainable_base:
        return ratio, 0
    return ratio, frozen_base_frees(s.shape, s.tokens, s.precision.hidden, s.checkpointed)


def _qlora_lever(s: Situation | None) -> Candidate | None:
    """4-bit NF4 weights (double quantization) for the decoder's linear layers, and what
    ``prepare_model_for_kbit_training`` costs: the other parameters (embeddings, norms, lm_head) upcast to
    float32, and with them the hidden states (the layer model with a float32 residual stream). From full
    fine-tuning, LoRA's float32 adapters come in and the frozen base keeps no inputs."""
    if s is None or s.setup.quant in ("nf4", "fp4"):
        return None
    setup = s.setup
    action = "load_in_4bit: nf4 with double quantization, bf16 compute, LoRA on top"
    if s.shape is None or not s.peak.weights:
        return Candidate("qlora", action, None, "")
    linear = s.shape.decoder_linear_params()
    width = 1 if setup.quant == "int8" else (dtype_bytes(setup.weight_dtype) or 2)
    packed = nf4_linear_bytes(s.shape, True)
    freed = linear * width - packed
    others = max(0, setup.total_params - linear - setup.lora_params)
    upcast = others * max(0, 4 - (dtype_bytes(setup.weight_dtype) or 2))
    p = s.precision
    adapters = 0 if p.adapter else sum(lora_tensor_sizes(s.shape, LORA_R, LINEAR_NAMES)) * 4
    weights = (s.peak.weights - freed + upcast + adapters) / s.peak.weights
    prepared = replace(p, hidden=4, quantized=True, trainable_base=False)
    if not p.adapter:  # QLoRA trains LoRA adapters
        prepared = replace(prepared, adapter=4, lora_r=LORA_R, lora_targets=LINEAR_NAMES)
    before, after = s.layer_model(p), s.layer_model(prepared)
    tokens, seq = s.tokens or 1, s.seq or 1
    ratio = after.total(tokens, seq) / before.total(tokens, seq) if before and after else 1.0
    ratio = s.layer_factor(ratio, checkpoints=4 / p.hidden)
    outside = frozen_base_frees(s.shape, tokens, p.hidden, s.checkpointed) if p.trainable_base else 0
    outside += final_norm_copy(s.shape, tokens, p.hidden) - final_norm_copy(s.shape, tokens, 4)
    trainable = 1.0
    if not setup.lora_r and setup.trainable_bytes:
        trainable = min(1.0, adapters / setup.trainable_bytes)
    basis = (
        f"linear weights {_fmt(linear * width)} -> {_fmt(packed)}; other parameters upcast to "
        f"float32 +{_fmt(upcast)}; layer activations x {ratio:.2f} with float32 hidden states"
    )
    if adapters:
        basis += f"; LoRA adapters +{_fmt(adapters)}, {_fmt(outside)} fewer activations outside the frozen layers"
    effect = Effect(weights=weights, layer=ratio, trainable=trainable, other_add=-outside)
    return Candidate("qlora", action, effect, basis)


def _rank_lever(s: Situation | None) -> Candidate | None:
    """LoRA rank halved: LoRA's parameters, their gradients and optimizer state halve, and so do the
    rank-wide activations (A's output, kept for B, in every LoRA layer)."""
    setup = s.setup if s else None
    if s is None or setup is None or not setup.lora_r or setup.lora_r < 2:
        return None
    r = setup.lora_r
    action = f"LoRA r {r} -> {r // 2}"
    lora_bytes = setup.lora_params * (s.precision.adapter or 4)
    weights = 1 - lora_bytes / 2 / s.peak.weights if s.peak.weights else 1.0
    lora_share = min(1.0, setup.lora_params / setup.trainable_params) if setup.trainable_params else 1.0
    kept = 1 - lora_share / 2
    layer = 1.0
    before, after = s.layer_model(), s.layer_model(replace(s.precision, lora_r=r // 2))
    if before is not None and after is not None and s.tokens and s.seq:
        layer = s.layer_factor(after.total(s.tokens, s.seq) / before.total(s.tokens, s.seq))
    elif s.tokens and s.layer_activations and setup.lora_modules:
        rank_wide = s.tokens * r * (s.precision.autocast or s.precision.adapter or 4) * setup.lora_modules
        layer = max(0.0, 1 - rank_wide / 2 / s.layer_activations)
    basis = (
        f"LoRA parameters {_fmt(lora_bytes)}, their gradients and optimizer state halve; "
        f"rank-wide activations {_fmt(s.layer_activations * (1 - layer) * 2)} halve"
    )
    return Candidate("rank", action, Effect(weights=weights, gradients=kept, optimizer=kept, layer=layer), basis)


FEWER_TARGETS = ("q_proj", "v_proj")
"""The target modules the fewer-targets lever proposes: the attention's query and value projections, as the
LoRA paper adapted."""


def _targets_lever(s: Situation | None) -> Candidate | None:
    """LoRA on the query and value projections only: the adapters' parameters, gradients and optimizer state
    shrink to theirs, and the layers no longer adapted stop keeping their inputs for the adapters' backward
    (a frozen base layer needs only its weight to pass the gradient on)."""
    setup = s.setup if s else None
    if s is None or setup is None or not setup.lora_r:
        return None
    current = tuple(sorted(set(s.precision.lora_targets)))
    fewer = tuple(name for name in FEWER_TARGETS if name in current)
    if not fewer or len(fewer) == len(current):
        return None
    action = f"LoRA on {', '.join(fewer)} only, not {len(current)} target modules ({', '.join(current)})"
    if s.shape is not None:
        share = sum(lora_tensor_sizes(s.shape, setup.lora_r, fewer)) / sum(
            lora_tensor_sizes(s.shape, setup.lora_r, current)
        )
    else:
        share = len(fewer) / len(current)
    lora_bytes = setup.lora_params * (s.precision.adapter or 4)
    weights = 1 - lora_bytes * (1 - share) / s.peak.weights if s.peak.weights else 1.0
    lora_share = min(1.0, setup.lora_params / setup.trainable_params) if setup.trainable_params else 1.0
    kept = 1 - lora_share * (1 - share)
    layer = 1.0
    before, after = s.layer_model(), s.layer_model(replace(s.precision, lora_targets=fewer))
    if before is not None and after is not None and s.tokens and s.seq:
        layer = s.layer_factor(after.total(s.tokens, s.seq) / before.total(s.tokens, s.seq))
    basis = (
        f"LoRA parameters {_fmt(lora_bytes)} x {share:.2f}, their gradients and optimizer state with them; "
        f"layer activations x {layer:.2f} (the inputs kept for the dropped adapters)"
    )
    return Candidate("targets", action, Effect(weights=weights, gradients=kept, optimizer=kept, layer=layer), basis)


def _optimizer_lever(s: Situation | None, knobs: dict[str, Any]) -> Candidate | None:
    """An 8-bit AdamW: two uint8 states and a float32 absmax per 256 elements instead of two 32-bit states
    (tensors under 4096 elements keep them), counted tensor by tensor where LoRA's shapes are known."""
    setup = s.setup if s else None
    name = (setup.optimizer if setup else None) or ""
    knob = knobs.get("optimizer")
    adam32 = knob == "adamw" or (knob is None and name in ("AdamW", "Adam"))
    if not adam32:
        return None
    action = "8-bit AdamW (bitsandbytes.optim.AdamW8bit)"
    overrides = {"optimizer": "adamw8bit"}
    if s is None or setup is None:
        return Candidate("optimizer", action, None, "", overrides=overrides)
    state = s.most("optimizer") or setup.optimizer_state_bytes or 0
    full = parameter_sizes(s.shape, setup.trainable_params) if s.shape and s.precision.trainable_base else None
    if s.shape is not None and setup.lora_r and setup.lora_params == setup.trainable_params:
        sizes = lora_tensor_sizes(s.shape, setup.lora_r, s.precision.lora_targets)
    elif full is not None and setup.trainable_params == setup.total_params:
        sizes = full
    else:
        sizes = [MIN_8BIT_SIZE * 64] * max(1, setup.trainable_params // (MIN_8BIT_SIZE * 64))
    old = sum(8 * n for n in sizes)  # 32-bit Adam: two float32 states per element
    new = sum(adam_8bit_bytes(n) for n in sizes)
    factor = new / old if old else 1.0
    small = sum(1 for n in sizes if n < MIN_8BIT_SIZE)
    basis = f"optimizer state {_fmt(state)} at the peak x {factor:.2f}"
    if small:
        basis += f" ({small} of {len(sizes)} tensors under {MIN_8BIT_SIZE} elements stay 32-bit)"
    return Candidate("optimizer", action, Effect(optimizer=factor), basis, overrides=overrides)


def _spread_lever(s: Situation | None, gpus: int) -> Candidate | None:
    """Inference: ``device_map="auto"`` places the decoder layers over the GPUs present, so each holds its
    share of the weights; the activations follow the hidden states from GPU to GPU, one layer at a time."""
    if s is None or not gpus or not s.peak.weights:
        return None
    action = 'from_pretrained(..., device_map="auto") to spread the layers over the GPUs'
    if gpus == 1:
        return Candidate("spread", action, NO_EFFECT, "one GPU is visible: there is nothing to spread over")
    basis = f"weights {_fmt(s.peak.weights)} over {gpus} GPUs: 1/{gpus} of them on each"
    return Candidate("spread", action, Effect(weights=1 / gpus), basis)


def _weights_levers(s: Situation | None, after_fix: bool) -> list[Candidate]:
    """Inference with 16- or 32-bit weights: the decoder's linear layers loaded in 8-bit (LLM.int8: one byte
    a weight and a float32 scale per output row) or in 4-bit NF4 with double quantization, through a
    ``BitsAndBytesConfig``; embeddings, norms and lm_head stay as they are. A quantized layer dequantizes
    (4-bit) or quantizes its input (8-bit) as it runs: that transient is one layer's and stays beside the
    activations' peak. ``after_fix``: the forward runs with autograd on, for nothing; the saving is the
    weights', counted for the forward fixed to run under ``torch.inference_mode()`` (with autograd on, what
    quantized layers keep for backward differs from what 16-bit ones keep, either way)."""
    setup = s.setup if s else None
    if s is None or setup is None or setup.quant or s.shape is None or not s.peak.weights:
        return []
    width = dtype_bytes(setup.weight_dtype) or 2
    linear = s.shape.decoder_linear_params()
    rows = s.shape.layers * sum(s.shape.linear_sizes(name)[1] for name in LINEAR_NAMES)
    levers = []
    for key, bits, quantized in (
        ("weights8", 8, linear + 4 * rows),
        ("weights4", 4, nf4_bytes(linear, True)),
    ):
        freed = min(s.peak.weights, linear * width) - quantized
        if freed <= 0:
            continue
        kind = "load_in_8bit" if bits == 8 else "load_in_4bit, nf4 with double quantization"
        action = f"load the weights in {bits}-bit (BitsAndBytesConfig({kind}))"
        basis = f"decoder linear weights {_fmt(linear * width)} -> {_fmt(quantized)}"
        if after_fix:
            basis += ", with the forward under torch.inference_mode() (the fix above)"
        levers.append(Candidate(key, action, Effect(weights=1 - freed / s.peak.weights), basis))
    return levers


def candidates(
    s: Situation | None, setup: TrainingSetup, findings: list[FindingLike], knobs: dict[str, Any], gpus: int = 0
) -> list[Candidate]:
    """Every lever that applies, before estimates and measurements. An inference test (forwards and no
    backward) gets the levers of inference; ``gpus``: the GPUs visible to it (0: none, the cpu backend)."""
    fixes = _fix_levers(s, findings, knobs)
    keys = {f.key for f in findings}
    if setup.inference:
        inferring = [
            *fixes,
            _batch_lever(s, knobs),
            _spread_lever(s, gpus),
            _seq_lever(s, knobs),
            _bf16_lever(s, knobs, "bf16_not_applied" in keys),
            *_weights_levers(s, "inference_with_grad" in keys),
        ]
        return [c for c in inferring if c is not None]
    fixed_checkpointing = bool(keys & {"checkpointing_eval", "checkpointing_ineffective"})
    found = [
        *fixes,
        _batch_lever(s, knobs),
        _checkpointing_lever(s, knobs, fixed_checkpointing) if s else _checkpointing_fallback(setup, knobs),
        _seq_lever(s, knobs),
        _bf16_lever(s, knobs, "bf16_not_applied" in keys),
        _lora_lever(s),
        _qlora_lever(s),
        _rank_lever(s),
        _targets_lever(s),
        _optimizer_lever(s, knobs),
    ]
    return [c for c in found if c is not None]


def _checkpointing_fallback(setup: TrainingSetup, knobs: dict[str, Any]) -> Candidate | None:
    if knobs.get("gradient_checkpointing") or (setup.gradient_checkpointing and setup.checkpointing_effective):
        return None
    action = "enable gradient checkpointing (model.gradient_checkpointing_enable())"
    return Candidate("checkpointing", action, None, "", overrides={"gradient_checkpointing": True})


# -- measuring, combining, recommending


def _reason(error: BaseException) -> str:
    text = error_line(error)
    return text if len(text) <= 160 else text[:157] + "..."


def _run(c: Candidate, measure: Callable[..., int], measured_as: str) -> tuple[int, str]:
    """The peak of ``c``'s run and how it ran. A step that takes ``batch`` but not ``accumulation`` runs one
    micro-batch of the smaller batch, with the gradients the micro-batches before it leave alive."""
    assert c.overrides is not None
    ran = "replayed the model on fake tensors" if measured_as == "replayed" else "re-ran the step"
    try:
        return measure(c.overrides), f"{ran} with {_knob_text(c.overrides)}"
    except MissingKnob as missing:
        if not (c.key == "batch" and missing.knob == "accumulation"):
            raise
    one = {name: value for name, value in c.overrides.items() if name != "accumulation"}
    how = (
        f"re-ran one micro-batch ({_knob_text(one)}, with the gradients of the micro-batches before it; "
        "the step takes no 'accumulation' argument)"
    )
    return measure(one, gradients_alive=True), how


def _measure_all(levers: list[Candidate], measure: Callable[..., int], measured_as: str) -> None:
    """Measure every lever that is a knob of the step: the reference run once, then one run per lever."""
    knob_levers = [c for c in levers if c.overrides]
    if not knob_levers:
        return
    try:
        reference = measure({})
    except Exception as error:  # noqa: BLE001 - any failure of the user's step falls back to the estimate
        for c in knob_levers:
            c.note = f"could not be measured: the reference run failed ({_reason(error)})"
        return
    for c in knob_levers:
        try:
            run, how = _run(c, measure, measured_as)
        except MissingKnob as missing:  # not a failure: the step has no way to turn it
            c.note = f"not measured: the registered step takes no '{missing.knob}' argument"
            continue
        except Exception as error:  # noqa: BLE001 - as above, for this lever alone
            c.note = f"could not be measured ({_reason(error)})"
            continue
        c.measured = reference - run
        c.runs = f"{how}: peak {_fmt(reference)} -> {_fmt(run)}"


def _lever(c: Candidate, measured_as: str) -> Lever:
    saving = c.saving
    assert saving is not None
    if c.measured is not None:
        source, basis = measured_as, c.runs
    else:
        source, basis = "estimated", "; ".join(part for part in (c.note, c.basis) if part)
    if saving == 0:
        basis += "; saves nothing"
    elif saving < 0:
        basis += f"; costs {_fmt(-saving)}"
    return Lever(key=c.key, action=c.action, saving=saving, source=source, basis=basis, estimated=c.estimate)


def combined_saving(chosen: list[Candidate], s: Situation | None) -> int:
    """What levers free together: the sum of their savings, less the overlap the estimates see (halving the
    batch and then the sequence frees three quarters of the activations, not all of them)."""
    total = sum(c.saving or 0 for c in chosen)
    effects = [c.effect for c in chosen if c.effect is not None and c.estimate is not None]
    if s is None or len(effects) < 2:
        return total
    together = NO_EFFECT
    for effect in effects:
        together = together.then(effect)
    apart = sum(c.estimate or 0 for c in chosen if c.effect is not None and c.estimate is not None)
    return total - (apart - s.saving(together))


def recommend(levers: list[Candidate], needed: int | None, s: Situation | None) -> list[Candidate]:
    """The combination with the lowest highest cost to quality whose combined saving covers ``needed``,
    preferring fewer levers, then the larger saving; where none covers it, the one that comes closest.
    Fixes count as one lever (all of them); levers that save nothing are never chosen."""
    if needed is None or needed <= 0:
        return []
    useful = [c for c in levers if (c.saving or 0) > 0]
    fixes = [c for c in useful if c.key == "fix"]
    units: list[list[Candidate]] = ([fixes] if fixes else []) + [[c] for c in useful if c.key != "fix"]
    best: tuple[Any, ...] | None = None
    chosen: list[Candidate] = []
    for size in range(1, len(units) + 1):
        for combo in itertools.combinations(units, size):
            members = [c for unit in combo for c in unit]
            saving = combined_saving(members, s)
            highest = max(LEVERS.index(c.key) for c in members)
            covers = saving >= needed
            # covering first; then the cheapest in quality, the fewest levers, the most freed
            key = (not covers, highest, size, -saving) if covers else (True, -saving, highest, size)
            if best is None or key < best:
                best, chosen = key, members
    return chosen


def advise(
    attribution: Attribution | None,
    setup: TrainingSetup,
    findings: list[Any],
    needed: int | None,
    knobs: dict[str, Any],
    measure: Callable[..., int] | None = None,
    measured_as: str = "measured",
    gpus: int = 0,
) -> Advice:
    """The advice for one test: its findings (said first), every lever that applies with its saving, in
    order of cost to quality, and the cheapest combination that frees ``needed`` bytes.

    ``attribution`` is the test's (None: the peak is modelled from ``setup``);
    ``findings`` have ``.key`` and ``.message`` (see
    :func:`pytest_gpumem.measure.introspect.findings`); ``knobs`` are the values the step
    ran with; ``measure``, where given, runs the step with knobs overridden and
    returns its peak (a :class:`pytest_gpumem.advise.whatif.Measure`; it is called with
    ``gradients_alive=True`` only after it raised MissingKnob): the levers that
    are knobs are then measured, not estimated. ``measured_as`` names how ``measure`` runs: ``measured``
    (the test's registered step, run again) or ``replayed`` (the test's model on fake tensors). ``gpus``:
    the CUDA devices visible to the test (0 on the cpu backend).
    """
    s = situation(attribution, setup, knobs)
    levers = candidates(s, setup, findings, knobs, gpus)
    for c in levers:
        if c.effect is not None and s is not None:
            c.estimate = s.saving(c.effect)
    if measure is not None:
        _measure_all(levers, measure, measured_as)
    if s is not None and s.modelled:
        for c in levers:
            if c.measured is None and c.basis:
                c.basis = f"modelled from the setup (no attribution): {c.basis}"
    levers = [c for c in levers if c.saving is not None]
    levers.sort(key=lambda c: (LEVERS.index(c.key), -(c.saving or 0)))
    chosen = recommend(levers, needed, s)
    return Advice(
        findings=[f.message for f in findings],
        levers=[_lever(c, measured_as) for c in levers],
        needed=needed,
        recommended=list(dict.fromkeys(c.key for c in chosen)),
        frees=combined_saving(chosen, s) if chosen else None,
    )
