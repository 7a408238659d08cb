"""Settings that are configured but do nothing, or silently cost memory, named from a
:class:`~pytest_gpumem.measure.introspect.TrainingSetup` with the numbers that make them matter."""

from __future__ import annotations

from dataclasses import dataclass

from pytest_gpumem.core.units import format_bytes
from pytest_gpumem.measure.introspect import HALF_DTYPES, TrainingSetup, dtype_bytes


@dataclass
class Finding:
    """A setting that is configured but has no effect, or silently costs memory.

    ``key`` is one of :data:`FINDINGS`; ``message`` is one line with the numbers.
    """

    key: str
    message: str


FINDINGS = (
    "checkpointing_eval",
    "checkpointing_ineffective",
    "inference_with_grad",
    "fp32_weights",
    "use_cache",
    "fp32_hidden",
    "fp32_logits",
    "bf16_not_applied",
    "quant_incomplete",
)
"""Finding keys, most important first (the order :func:`findings` reports them in)."""


def findings(setup: TrainingSetup) -> list[Finding]:
    """The settings of ``setup`` that have no effect or silently cost memory, most important first.

    Each check runs only when the facts that decide it were seen.
    """
    found: list[Finding] = []
    layers = f"{setup.num_layers} decoder layers" if setup.num_layers else "the decoder layers"
    tokens = setup.batch * setup.seq if setup.batch and setup.seq else None
    shape = f"batch {setup.batch} x seq {setup.seq}" if tokens else ""
    if setup.gradient_checkpointing and setup.training is False:
        found.append(
            Finding(
                "checkpointing_eval",
                "gradient checkpointing is enabled but the model ran the step in eval mode, so nothing is "
                f"recomputed and {layers} keep all their activations: call model.train()",
            )
        )
    if setup.gradient_checkpointing and setup.training and setup.checkpointing_effective is False:
        found.append(
            Finding(
                "checkpointing_ineffective",
                f"gradient checkpointing is enabled and the model is in train mode, but none of {layers} was "
                "recomputed in backward, so it saves nothing: enable it with model.gradient_checkpointing_enable() "
                "(not by setting a gradient_checkpointing attribute) on a model whose layers support it",
            )
        )
    if setup.grad_forwards and setup.backward is False:
        forwards = f"{setup.grad_forwards} forward pass{'es' if setup.grad_forwards > 1 else ''}"
        found.append(
            Finding(
                "inference_with_grad",
                f"the model ran {forwards} with autograd on ({shape or 'its inputs'}) and nothing called backward: "
                f"{layers} kept their activations for a backward that never came: run inference under "
                "torch.inference_mode() (or torch.no_grad())",
            )
        )
    quantized = setup.quant in ("nf4", "fp4", "int8")  # whose float32 norms and embeddings are deliberate
    if setup.weight_dtype == "float32" and setup.config_dtype in HALF_DTYPES and setup.weight_bytes and not quantized:
        found.append(
            Finding(
                "fp32_weights",
                f"the weights are float32 ({format_bytes(setup.weight_bytes)}) although the model's config names "
                f"{setup.config_dtype}: load it with from_pretrained(..., dtype=torch.{setup.config_dtype}), "
                "at half the size",
            )
        )
    if setup.use_cache and setup.training:
        size = ""
        itemsize = dtype_bytes(setup.hidden_dtype or setup.compute_dtype)
        if tokens and setup.num_layers and setup.num_kv_heads and setup.head_dim and itemsize:
            cache = 2 * setup.num_layers * tokens * setup.num_kv_heads * setup.head_dim * itemsize
            size = f" ({format_bytes(cache)} for {shape})"
        found.append(
            Finding(
                "use_cache",
                f"use_cache=True during training: the KV cache of {layers}{size} is kept alive through backward: "
                "set model.config.use_cache = False",
            )
        )
    if setup.hidden_dtype == "float32" and setup.compute_dtype in HALF_DTYPES:
        size = ""
        if tokens and setup.hidden_size:
            per_layer = tokens * setup.hidden_size * 4
            size = f" ({format_bytes(per_layer)} per layer output for {shape}, twice the {setup.compute_dtype} size)"
        found.append(
            Finding(
                "fp32_hidden",
                f"hidden states are float32 although the compute dtype is {setup.compute_dtype}{size}: float32 "
                "norms or embeddings (prepare_model_for_kbit_training upcasts them) keep the residual stream in "
                f"float32, which also rules out the fused {setup.compute_dtype} attention kernels",
            )
        )
    half = setup.autocast if setup.autocast in HALF_DTYPES else setup.compute_dtype
    if setup.logits_dtype == "float32" and half in HALF_DTYPES:
        size = ""
        if tokens and setup.vocab_size:
            size = f" ({format_bytes(tokens * setup.vocab_size * 4)} for {shape} x vocab {setup.vocab_size})"
        found.append(
            Finding(
                "fp32_logits",
                f"logits are float32 although the compute dtype is {half}{size}, twice their {half} size: "
                "a float32 lm_head (prepare_model_for_kbit_training upcasts it) or an upcast in the model",
            )
        )
    requested, source = None, ""
    if setup.autocast_requested in HALF_DTYPES:
        requested, source = setup.autocast_requested, "autocast"
    elif setup.quant in ("nf4", "fp4") and setup.compute_dtype in HALF_DTYPES:
        requested, source = setup.compute_dtype, "bnb_4bit_compute_dtype"
    if requested and setup.matmul_dtype == "float32":
        found.append(
            Finding(
                "bf16_not_applied",
                f"{requested} was requested ({source}) but the decoder's matmuls ran in float32, at twice the "
                f"activation memory: run the forward under torch.autocast(device_type, dtype=torch.{requested}) "
                f"or load the model in {requested}",
            )
        )
    if setup.quant in ("nf4", "fp4", "int8") and setup.quantized_layers < setup.linear_layers:
        bits = "8-bit" if setup.quant == "int8" else "4-bit"
        left = ", ".join(setup.unquantized) or "?"
        found.append(
            Finding(
                "quant_incomplete",
                f"a {setup.quant} quantization config is present but only {setup.quantized_layers} of "
                f"{setup.linear_layers} decoder linear layers are {bits}; left unquantized: {left}",
            )
        )
    return found
