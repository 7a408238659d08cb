"""The advisor: which lever would give a test's memory back, what each saves, and which to pull first.

The levers are those of :data:`~pytest_gpumem.sample.LEVERS`, in the order of
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
:class:`~pytest_gpumem.introspect.TrainingSetup`, gives the ratio; the
attribution gives the bytes it applies to. Where the test registered a
training step, the levers that are knobs of that step are then *measured*:
the step runs again with the knob turned (see :mod:`pytest_gpumem.whatif`),
and the estimate is kept beside the measurement.

The recommendation is the combination of levers with the lowest highest cost
to quality that frees what the test needs, preferring fewer levers; levers
that save nothing or cost memory are reported and never recommended.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any, Protocol

from .introspect import TrainingSetup, dtype_bytes
from .sample import LEVERS, Advice, Attribution, Breakdown, Lever
from .units import format_bytes
from .whatif import MissingKnob

HALF = ("bfloat16", "float16")
MIN_8BIT_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep 32-bit state for tensors with fewer elements (``min_8bit_size``)."""
OPTIMIZER_8BIT_BLOCK = 256
"""Elements per float32 absmax in bitsandbytes' blockwise 8-bit optimizer state."""
NF4_BLOCK = 64
"""Elements per absmax in bitsandbytes' 4-bit weights; double quantization stores those absmax as uint8 with
one float32 per 256 of them."""
LORA_R = 16
"""The LoRA rank the LoRA and QLoRA levers propose (on all linear layers), as QLoRA recipes do."""
_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class FindingLike(Protocol):
    """A :class:`~pytest_gpumem.introspect.Finding`: a setting that does nothing or costs memory."""

    key: str
    message: str


# -- the model's shape, and what one decoder layer keeps for backward


@dataclass(frozen=True)
class Shape:
    """The sizes of a Llama-like decoder (Llama, Mistral, Qwen2: attention, gated MLP, RMSNorm)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @property
    def q_width(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    @classmethod
    def of(cls, setup: TrainingSetup) -> Shape | None:
        """The shape of ``setup``'s model; None where its layers or hidden size were not seen."""
        if not setup.num_layers or not setup.hidden_size:
            return None
        heads = setup.num_heads or max(1, setup.hidden_size // 128)
        head_dim = setup.head_dim or setup.hidden_size // heads
        return cls(
            layers=setup.num_layers,
            hidden=setup.hidden_size,
            intermediate=setup.intermediate_size or 4 * setup.hidden_size,
            heads=heads,
            kv_heads=setup.num_kv_heads or heads,
            head_dim=head_dim,
            vocab=setup.vocab_size or 0,
        )

    def linear_sizes(self, name: str) -> tuple[int, int]:
        """(in, out) features of the decoder linear layer called ``name`` (``q_proj``, ..., ``down_proj``)."""
        h, i = self.hidden, self.intermediate
        return {
            "q_proj": (h, self.q_width),
            "k_proj": (h, self.kv_width),
            "v_proj": (h, self.kv_width),
            "o_proj": (self.q_width, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }.get(name, (h, h))

    def decoder_linear_params(self) -> int:
        """Parameters of all decoder linear layers: the weights 4-bit quantization packs."""
        return self.layers * sum(a * b for a, b in map(self.linear_sizes, _LINEAR_NAMES))


@dataclass(frozen=True)
class Precision:
    """The dtypes (as bytes per element) that decide what a decoder layer keeps for backward.

    ``hidden``: the residual stream (float32 where ``prepare_model_for_kbit_training``
    upcast the embeddings and norms); ``weight``: the unquantized parameters;
    ``adapter``: LoRA's weights (peft upcasts them to float32), 0 without LoRA;
    ``autocast``: the autocast dtype, 0 without; ``quantized``: bitsandbytes base
    layers, which keep nothing of their input for backward and return their input's
    dtype; ``trainable_base``: full fine-tuning, where every linear layer keeps its
    input for its weight's gradient.
    """

    hidden: int = 2
    weight: int = 2
    adapter: int = 0
    autocast: int = 0
    quantized: bool = False
    trainable_base: bool = False
    lora_r: int = 0
    lora_targets: tuple[str, ...] = ()

    @classmethod
    def of(cls, setup: TrainingSetup, knobs: dict[str, Any]) -> Precision:
        lora = bool(setup.lora_r)
        adapter = 0
        if lora:
            adapter = round(setup.trainable_bytes / setup.trainable_params) if setup.trainable_params else 4
        autocast = setup.autocast or knobs.get("autocast")
        return cls(
            hidden=dtype_bytes(setup.hidden_dtype) or dtype_bytes(setup.weight_dtype) or 4,
            weight=dtype_bytes(setup.weight_dtype) or 2,
            adapter=adapter,
            autocast=dtype_bytes(autocast) if autocast in HALF else 0,
            quantized=setup.quant in ("nf4", "fp4", "int8") and setup.quantized_layers > 0,
            trainable_base=not lora and setup.trainable_params > setup.total_params // 2,
            lora_r=setup.lora_r or 0,
            lora_targets=_targets(setup) if lora else (),
        )


def _targets(setup: TrainingSetup) -> tuple[str, ...]:
    return tuple(sorted(set(setup.lora_targets))) or _LINEAR_NAMES


def attention_kernel(attention: str | None, query_bytes: int, gqa: bool, device: str) -> str:
    """Which kind of attention kernel runs: ``fused`` (flash or memory-efficient: memory linear in the
    sequence), ``math`` (PyTorch's reference SDPA: keeps the attention probabilities) or ``eager``.

    On CUDA, SDPA has no fused kernel for float32 queries with grouped key/value
    heads (flash needs 16-bit inputs, memory-efficient attention takes no GQA),
    so float32 hidden states with GQA fall back to the math kernel. The CPU's
    flash kernel takes float32 and GQA.
    """
    if attention == "eager":
        return "eager"
    if attention in (None, "sdpa") and device.startswith("cuda") and query_bytes >= 4 and gqa:
        return "math"
    return "fused"


@dataclass(frozen=True)
class LayerBytes:
    """What one decoder layer keeps for backward: ``linear`` bytes per token, ``quadratic`` bytes per token
    and per position of the sequence (the attention probabilities some kernels keep), and ``fixed`` bytes
    that do not depend on the input (weights cast to the autocast dtype)."""

    linear: float
    quadratic: float = 0.0
    fixed: float = 0.0

    def total(self, tokens: int, seq: int) -> float:
        return tokens * (self.linear + self.quadratic * seq) + self.fixed

    def quadratic_share(self, tokens: int, seq: int) -> float:
        whole = self.total(tokens, seq)
        return tokens * self.quadratic * seq / whole if whole else 0.0

    def fixed_share(self, tokens: int, seq: int) -> float:
        whole = self.total(tokens, seq)
        return self.fixed / whole if whole else 0.0


def layer_bytes(shape: Shape, precision: Precision, attention: str | None, device: str) -> LayerBytes:
    """A model of the bytes one Llama-like decoder layer keeps for backward.

    What each operation keeps, as autograd saves it (only what the gradients
    that are needed require):

    - each RMSNorm keeps its input in float32 (the input itself when the residual
      stream is float32, else a float32 copy), and a float32 rsqrt per token;
    - a group of linear layers reading one tensor (q/k/v; gate/up) keeps it for
      LoRA's A matrix (or a trainable base weight): once, shared, where it already
      has the dtype they compute in; else one cast copy per layer (peft casts it
      to the adapter's dtype, autocast to its own; on the CPU peft casts under
      autocast too); A's rank-wide output is kept for B. Frozen base layers keep
      nothing of their input: bitsandbytes' keep their packed weight, plain ones
      under autocast a bf16 copy of it (autocast caches casts of trainable
      weights only, and LoRA's are cast once and kept too);
    - projections return their input's dtype where quantized (bitsandbytes casts
      back), else the autocast dtype; RoPE promotes q and k to the hidden dtype;
    - attention keeps q, k, v and its output, which o_proj reads in place (fused
      kernels); or the scaled q, the repeated k and v and the attention
      probabilities (math SDPA; eager: a float32 softmax, plus its cast where
      the matmul is not in float32), with a contiguous copy of its output for
      o_proj;
    - the gated MLP keeps gate (for SiLU), SiLU's output and up (for their
      product), and the product for down_proj.
    """
    h, i, nh = shape.hidden, shape.intermediate, shape.heads
    qw, kvw = shape.q_width, shape.kv_width
    p = precision
    targets = set(p.lora_targets) if p.adapter else set()

    def group_input(width: int, dtype: int, names: tuple[str, ...]) -> tuple[float, bool]:
        """Bytes per token of cast copies kept of the input of linear layers ``names`` (all reading one
        tensor), and whether the input itself is kept."""
        lora = [n for n in names if n in targets]
        copies, shared = 0, False
        if p.autocast:
            lora_copies = dtype != p.autocast or (device == "cpu" and dtype != p.adapter)
            copies += len(lora) if lora_copies else 0
            shared = bool(lora) and not lora_copies
            if p.trainable_base:
                copies += len(names) if dtype != p.autocast else 0
                shared = shared or dtype == p.autocast
            kept = copies * width * p.autocast + len(lora) * p.lora_r * p.autocast
        else:
            copies = len(lora) if lora and dtype != p.adapter else 0
            shared = (bool(lora) and dtype == p.adapter) or p.trainable_base
            kept = copies * width * p.adapter + len(lora) * p.lora_r * p.adapter
        return kept, shared

    def projected(dtype: int) -> int:
        return dtype if p.quantized else (p.autocast or dtype)

    linear: float = 2 * (4 * h + 4)  # the two RMSNorms: float32 input, float32 rsqrt
    x = p.hidden  # the norms' output dtype
    kept, shared = group_input(h, x, ("q_proj", "k_proj", "v_proj"))
    linear += kept + (h * x if shared else 0)
    q = max(projected(x), p.hidden)  # RoPE multiplies by cos/sin of the hidden dtype
    kernel = p.autocast or q
    kind = attention_kernel(attention, kernel, shape.kv_heads < nh, device)
    quadratic = 0.0
    kept, shared = group_input(qw, kernel, ("o_proj",))
    linear += kept
    if kind == "fused":
        linear += kernel * (2 * qw + 2 * kvw) + 4 * nh  # q, k, v, the output (o_proj's input); log-sum-exp
    else:
        repeated = shape.kv_heads < nh or kind == "math"
        linear += kernel * (3 * qw if repeated else qw + 2 * kvw)  # q, and k and v repeated for every head
        quadratic += nh * 4  # the softmax's float32 output
        if kind == "eager" and kernel != 4:
            quadratic += nh * kernel  # cast back for the second matmul
        linear += qw * kernel if shared else 0  # the output's contiguous copy, o_proj's input
    kept, shared = group_input(h, x, ("gate_proj", "up_proj"))
    linear += kept + (h * x if shared else 0)
    g = projected(x)
    linear += 3 * i * g  # gate (for SiLU), SiLU's output and up (for their product)
    kept, shared = group_input(i, g, ("down_proj",))
    linear += kept + (i * g if shared else 0)
    fixed = 0.0
    if p.autocast and not p.quantized and p.weight != p.autocast:
        fixed += p.autocast * shape.decoder_linear_params() / shape.layers
    if p.autocast and p.adapter and p.adapter != p.autocast:
        fixed += p.autocast * p.lora_r * sum(sum(shape.linear_sizes(n)) for n in targets)
    return LayerBytes(linear, quadratic, fixed)


def checkpoint_bytes(shape: Shape, tokens: int, hidden: int) -> int:
    """What gradient checkpointing keeps: each decoder layer's input hidden states."""
    return shape.layers * tokens * shape.hidden * hidden


def nf4_bytes(params: int, double_quant: bool) -> int:
    """Bytes of ``params`` weights in 4-bit: half a byte each, plus one absmax per 64 (float32; with double
    quantization uint8, plus a float32 per 256 absmax)."""
    blocks = math.ceil(params / NF4_BLOCK)
    stats = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return params // 2 + stats


def adam_8bit_bytes(numel: int) -> int:
    """bitsandbytes' 8-bit Adam state of one tensor: two uint8 states and their float32 absmax per 256
    elements; tensors under 4096 elements keep two float32 states."""
    if numel < MIN_8BIT_SIZE:
        return 8 * numel
    return 2 * numel + 2 * 4 * math.ceil(numel / OPTIMIZER_8BIT_BLOCK)


def lora_tensor_sizes(shape: Shape, r: int, targets: Iterable[str]) -> list[int]:
    """Elements of every LoRA matrix (A: r x in, B: out x r) of every decoder layer."""
    sizes: list[int] = []
    for name in targets:
        fan_in, fan_out = shape.linear_sizes(name)
        sizes += [r * fan_in, r * fan_out] * shape.layers
    return sizes


# -- effects, and the peak they leave


@dataclass(frozen=True)
class Effect:
    """How a lever changes the consumers at any moment: factors on each, bytes added to the activations
    outside the decoder layers (in forward and backward), and whether gradients stay alive through
    forward and backward (gradient accumulation: from the second micro-batch on).

    ``recompute`` (gradient checkpointing) adds a moment of its own: backward recomputing one layer, when
    the layers hold their checkpoints plus that layer's activations (this share of all the layers'
    activations) and the loss's tensors are gone.
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
        )

    def on(self, breakdown: Breakdown, stage: str, full_gradients: int) -> Breakdown:
        """The consumers of ``breakdown`` (taken in ``stage``) with this effect."""
        passes = stage in ("forward", "backward", "")
        layer = breakdown.layer_activations * self.layer
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
    return levers


def _use_cache_fix(s: Situation | None) -> Candidate:
    """use_cache=True in training: the KV cache (concatenated copies of every layer's keys and values) lives
    until backward. Where a fused attention kernel keeps those very tensors for backward, it costs nothing."""
    action = "set model.config.use_cache = False for training"
    if s is None or s.shape is None or not s.tokens:
        return Candidate("fix", action, None, "")
    p = s.precision
    # RoPE promotes keys to the hidden dtype; values come out of the projection in the same dtype where
    # they matter here (a float32 residual stream)
    cache = 2 * s.shape.layers * s.tokens * s.shape.kv_width * p.hidden
    kernel = attention_kernel(s.setup.attention, p.autocast or p.hidden, s.shape.kv_heads < s.shape.heads, s.device)
    if kernel == "fused" and not p.autocast:
        return Candidate(
            "fix", action, Effect(), f"KV cache {_fmt(cache)}: the same tensors the {kernel} attention keeps anyway"
        )
    factor = max(0.0, 1 - cache / s.layer_activations) if s.layer_activations else 1.0
    return Candidate("fix", action, Effect(layer=factor), f"KV cache {_fmt(cache)} kept until backward")


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
    effect = Effect(layer=layer, other=1 / factor, accumulate=True)
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
    forward and kept for backward (its weights frozen, autocast does not cache the cast)."""
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
    return Effect(layer=factor, other_add=head), basis


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
    lora = sum(lora_tensor_sizes(s.shape, LORA_R, _LINEAR_NAMES))
    share = min(1.0, lora * 4 / max(1, setup.trainable_bytes))  # LoRA's float32 against what trains now
    added = lora * 4 / s.peak.weights if s.peak.weights else 0.0
    basis = (
        f"{setup.trainable_params / 1e6:.0f}M trainable parameters -> {lora / 1e6:.1f}M: gradients "
        f"{_fmt(s.most('gradients'))} and optimizer state {_fmt(s.most('optimizer'))} x {share:.3f}"
    )
    return Candidate("lora", action, Effect(weights=1 + added, trainable=share), basis)


def _qlora_lever(s: Situation | None) -> Candidate | None:
    """4-bit NF4 weights (double quantization) for the decoder's linear layers, and what
    ``prepare_model_for_kbit_training`` costs: the other parameters (embeddings, norms, lm_head) upcast to
    float32, and with them the hidden states (the layer model with a float32 residual stream)."""
    if s is None or s.setup.quant in ("nf4", "fp4"):
        return None
    setup = s.setup
    action = "load_in_4bit: nf4 with double quantization, bf16 compute, LoRA on top"
    if s.shape is None or not s.peak.weights:
        return Candidate("qlora", action, None, "")
    linear = s.shape.decoder_linear_params()
    width = 1 if setup.quant == "int8" else (dtype_bytes(setup.weight_dtype) or 2)
    freed = linear * width - nf4_bytes(linear, True)
    others = max(0, setup.total_params - linear - setup.lora_params)
    upcast = others * max(0, 4 - (dtype_bytes(setup.weight_dtype) or 2))
    weights = (s.peak.weights - freed + upcast) / s.peak.weights
    p = s.precision
    prepared = replace(p, hidden=4, quantized=True, trainable_base=False)
    if not p.adapter:  # QLoRA trains LoRA adapters
        prepared = replace(prepared, adapter=4, lora_r=LORA_R, lora_targets=_LINEAR_NAMES)
    before, after = s.layer_model(p), s.layer_model(prepared)
    tokens, seq = s.tokens or 1, s.seq or 1
    ratio = after.total(tokens, seq) / before.total(tokens, seq) if before and after else 1.0
    ratio = s.layer_factor(ratio, checkpoints=4 / p.hidden)
    trainable = 1.0
    if not setup.lora_r and setup.trainable_bytes:
        trainable = min(1.0, sum(lora_tensor_sizes(s.shape, LORA_R, _LINEAR_NAMES)) * 4 / setup.trainable_bytes)
    basis = (
        f"linear weights {_fmt(linear * width)} -> {_fmt(nf4_bytes(linear, True))}; other parameters upcast to "
        f"float32 +{_fmt(upcast)}; layer activations x {ratio:.2f} with float32 hidden states"
    )
    return Candidate("qlora", action, Effect(weights=weights, layer=ratio, trainable=trainable), basis)


def _rank_lever(s: Situation | None) -> Candidate | None:
    """LoRA rank halved: LoRA's parameters, their gradients and optimizer state halve, and so do the
    rank-wide activations (A's output, kept for B, in every LoRA layer)."""
    setup = s.setup if s else None
    if s is None or setup is None or not setup.lora_r or setup.lora_r < 2:
        return None
    r = setup.lora_r
    action = f"LoRA r {r} -> {r // 2} (or fewer target modules)"
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
    if s.shape is not None and setup.lora_r and setup.lora_params == setup.trainable_params:
        sizes = lora_tensor_sizes(s.shape, setup.lora_r, s.precision.lora_targets)
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


def candidates(
    s: Situation | None, setup: TrainingSetup, findings: list[FindingLike], knobs: dict[str, Any]
) -> list[Candidate]:
    """Every lever that applies, before estimates and measurements."""
    fixes = _fix_levers(s, findings, knobs)
    keys = {f.key for f in findings}
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
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text if len(text) <= 160 else text[:157] + "..."


def _run(c: Candidate, measure: Callable[..., int]) -> tuple[int, str]:
    """The peak of ``c``'s run and how it ran. A step that takes ``batch`` but not ``accumulation`` runs one
    micro-batch of the smaller batch, with the gradients the micro-batches before it leave alive."""
    assert c.overrides is not None
    try:
        return measure(c.overrides), f"re-ran the step with {_knob_text(c.overrides)}"
    except MissingKnob as missing:
        if not (c.key == "batch" and missing.knob == "accumulation"):
            raise
    one = {name: value for name, value in c.overrides.items() if name != "accumulation"}
    how = (
        f"re-ran one micro-batch ({_knob_text(one)}, with the gradients of the micro-batches before it; "
        "the step takes no 'accumulation' argument)"
    )
    return measure(one, gradients_alive=True), how


def _measure_all(levers: list[Candidate], measure: Callable[..., int]) -> None:
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
            run, how = _run(c, measure)
        except MissingKnob as missing:  # not a failure: the step has no way to turn it
            c.note = f"not measured: the registered step takes no '{missing.knob}' argument"
            continue
        except Exception as error:  # noqa: BLE001 - as above, for this lever alone
            c.note = f"could not be measured ({_reason(error)})"
            continue
        c.measured = reference - run
        c.runs = f"{how}: peak {_fmt(reference)} -> {_fmt(run)}"


def _lever(c: Candidate) -> Lever:
    saving = c.saving
    assert saving is not None
    if c.measured is not None:
        source, basis = "measured", c.runs
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
) -> Advice:
    """The advice for one test: its findings (said first), every lever that applies with its saving, in
    order of cost to quality, and the cheapest combination that frees ``needed`` bytes.

    ``attribution`` is the test's (None: the peak is modelled from ``setup``);
    ``findings`` have ``.key`` and ``.message`` (see
    :func:`pytest_gpumem.introspect.findings`); ``knobs`` are the values the step
    ran with; ``measure``, where given, runs the step with knobs overridden and
    returns its peak (a :class:`pytest_gpumem.whatif.Measure`; it is called with
    ``gradients_alive=True`` only after it raised MissingKnob): the levers that
    are knobs are then measured, not estimated.
    """
    s = situation(attribution, setup, knobs)
    levers = candidates(s, setup, findings, knobs)
    for c in levers:
        if c.effect is not None and s is not None:
            c.estimate = s.saving(c.effect)
    if measure is not None:
        _measure_all(levers, measure)
    if s is not None and s.modelled:
        for c in levers:
            if c.measured is None and c.basis:
                c.basis = f"modelled from the setup (no attribution): {c.basis}"
    levers = [c for c in levers if c.saving is not None]
    levers.sort(key=lambda c: (LEVERS.index(c.key), -(c.saving or 0)))
    chosen = recommend(levers, needed, s)
    return Advice(
        findings=[f.message for f in findings],
        levers=[_lever(c) for c in levers],
        needed=needed,
        recommended=list(dict.fromkeys(c.key for c in chosen)),
    )
