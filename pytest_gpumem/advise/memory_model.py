"""The memory model: what a Llama-like decoder keeps for backward, by dtype, kernel and LoRA targets.

One place for the sizes both the advisor's levers and the estimate backend use: the model's
:class:`Shape`, the :class:`Precision` it runs in, the bytes one decoder layer keeps
(:func:`layer_bytes`), the attention kernel CUDA picks (:func:`sdpa_kernel`), 4-bit weights, 8-bit
optimizer state and LoRA tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from pytest_gpumem.measure.introspect import HALF_DTYPES, TrainingSetup, dtype_bytes

MIN_8BIT_SIZE = 4096
"""bitsandbytes' 8-bit optimizers keep 32-bit state for tensors with fewer elements (``min_8bit_size``)."""
OPTIMIZER_8BIT_BLOCK = 256
"""Elements per float32 absmax in bitsandbytes' blockwise 8-bit optimizer state."""
NF4_BLOCK = 64
"""Elements per absmax in bitsandbytes' 4-bit weights; double quantization stores those absmax as uint8 with
one float32 per 256 of them."""
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
"""The linear layers of a Llama-like decoder layer, which LoRA's ``all-linear`` targets."""


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
        return self.layers * sum(a * b for a, b in map(self.linear_sizes, LINEAR_NAMES))


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
            autocast=dtype_bytes(autocast) if autocast in HALF_DTYPES else 0,
            quantized=setup.quant in ("nf4", "fp4", "int8") and setup.quantized_layers > 0,
            trainable_base=not lora and setup.trainable_params > setup.total_params // 2,
            lora_r=setup.lora_r or 0,
            lora_targets=_targets(setup) if lora else (),
        )


def _targets(setup: TrainingSetup) -> tuple[str, ...]:
    return tuple(sorted(set(setup.lora_targets))) or LINEAR_NAMES


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
      stream is float32, else a float32 copy), and a float32 rsqrt per token; where
      its weight trains, also the normalized input the weight multiplies; where the
      base is frozen, the first layer's keeps nothing (its input needs no grad);
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

    x = p.hidden  # the norms' output dtype
    linear: float = 2 * (4 * h + 4)  # the two RMSNorms: float32 input, float32 rsqrt
    if p.trainable_base:
        linear += 2 * h * x  # and, where their weights train, the normalized input the weights multiply
    else:  # the first layer's input norm reads the frozen embeddings' output, which needs no grad: it keeps nothing
        linear -= (4 * h + 4 if x != 4 else 4) / shape.layers
    kept, shared = group_input(h, x, ("q_proj", "k_proj", "v_proj"))
    linear += kept + (h * x if shared else 0)
    q = max(projected(x), p.hidden)  # RoPE multiplies by cos/sin of the hidden dtype
    kernel = p.autocast or q
    kind = attention_kernel(attention, kernel, shape.kv_heads < nh, device, shape.head_dim)
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


def frozen_base_frees(shape: Shape, tokens: int, hidden: int, checkpointed: bool) -> int:
    """What full fine-tuning keeps outside the decoder layers and a frozen base does not: the final norm's
    normalized input (for its weight), lm_head's input (for its weight), and the embeddings' output, which
    the first layer's norm keeps only where it requires grad (with checkpointing it is kept as a
    checkpoint either way)."""
    return (2 if checkpointed else 3) * tokens * shape.hidden * hidden


def final_norm_copy(shape: Shape, tokens: int, hidden: int) -> int:
    """What the final norm keeps outside the decoder layers: a float32 copy of its input where the hidden
    states are not float32 (a float32 input is the last layer's output, kept as the layers' own)."""
    return tokens * shape.hidden * 4 if hidden != 4 else 0


def nf4_bytes(params: int, double_quant: bool) -> int:
    """Bytes of ``params`` weights in 4-bit: half a byte each, plus one absmax per 64 (float32; with double
    quantization uint8, plus a float32 per 256 absmax)."""
    blocks = math.ceil(params / NF4_BLOCK)
    stats = blocks + 4 * math.ceil(blocks / 256) if double_quant else 4 * blocks
    return params // 2 + stats


DOUBLE_QUANT_STATE = 256 * 4 + 4
"""Bytes each 4-bit weight with double quantization keeps besides its absmax: its own copy of the 8-bit
quantization map of the absmax (256 float32) and their float32 offset."""


def nf4_linear_bytes(shape: Shape, double_quant: bool) -> int:
    """Bytes of the decoder's linear weights in 4-bit, weight by weight (each has its own absmax blocks and,
    with double quantization, its own quantization state)."""
    state = DOUBLE_QUANT_STATE if double_quant else 0
    one_layer = sum(nf4_bytes(a * b, double_quant) + state for a, b in map(shape.linear_sizes, LINEAR_NAMES))
    return shape.layers * one_layer


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


def parameter_sizes(shape: Shape, params: int) -> list[int] | None:
    """Elements of every parameter tensor of a Llama-like model of ``params`` parameters: the decoder's
    linear weights and norms, the final norm, then vocab x hidden tables (the embeddings, an untied
    lm_head) and what remains as one tensor. None where ``params`` is smaller than the shape says."""
    sizes = [a * b for a, b in map(shape.linear_sizes, LINEAR_NAMES)] * shape.layers
    sizes += [shape.hidden] * (2 * shape.layers + 1)
    rest = params - sum(sizes)
    if rest < 0:
        return None
    table = shape.vocab * shape.hidden
    while table and rest >= table:
        sizes.append(table)
        rest -= table
    return [*sizes, rest] if rest else sizes


def sdpa_kernel(half: bool, head_dim: int, grouped: bool, masked: bool, capability: tuple[int, int]) -> str:
    """The kernel CUDA's ``scaled_dot_product_attention`` runs: ``cudnn``, ``flash``, ``efficient`` or ``math``.

    As measured with torch 2.11 on an H200: 16-bit inputs without an explicit mask run cuDNN attention on
    sm90 and later (grouped key/value heads included), flash attention on sm80-sm89 (head sizes up to 256,
    multiples of 8); memory-efficient attention takes float32 and masks but no grouped heads; the math kernel
    takes the rest, float32 queries with grouped key/value heads among them. ``grouped``: the call passes
    fewer key/value heads than query heads (``enable_gqa``).
    """
    if half and not masked and head_dim <= 256 and head_dim % 8 == 0:
        if capability >= (9, 0) and head_dim <= 128:
            return "cudnn"
        if capability >= (8, 0):
            return "flash"
    if not grouped and head_dim % (8 if half else 4) == 0:
        return "efficient"
    return "math"


def sdpa_grouped(model_gqa: bool, masked: bool) -> bool:
    """Whether transformers hands SDPA grouped key/value heads: only without a mask (``use_gqa_in_sdpa``);
    with one it repeats the key/value heads first."""
    return model_gqa and not masked


def attention_kernel(
    attention: str | None,
    query_bytes: int,
    gqa: bool,
    device: str,
    head_dim: int = 128,
    masked: bool = False,
    capability: tuple[int, int] = (9, 0),
) -> str:
    """Which kind of attention kernel a transformers model runs: ``fused`` (cuDNN, flash or
    memory-efficient: memory linear in the sequence), ``math`` (PyTorch's reference SDPA: keeps the
    attention probabilities) or ``eager``. On CUDA it is :func:`sdpa_kernel`'s choice for the call
    transformers makes (an unpadded training batch passes no mask); the CPU's flash kernel takes float32
    and grouped heads."""
    if attention == "eager":
        return "eager"
    if attention not in (None, "sdpa") or not device.startswith("cuda"):
        return "fused"
    grouped = sdpa_grouped(gqa, masked)
    kernel = sdpa_kernel(query_bytes < 4, head_dim, grouped, masked, capability)
    return "math" if kernel == "math" else "fused"
