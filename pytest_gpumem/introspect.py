"""What a test's training setup really is: read from the model, the optimizer and one observed step.

The advisor needs facts, not the user's intentions: whether gradient
checkpointing is enabled *and* recomputes, the dtype hidden states and logits
really have, how many linear layers a quantization config really quantized,
LoRA's rank and targets, the trainable parameters, the optimizer, the inputs'
batch and sequence length.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TrainingSetup:
    """Facts about one test's training setup; None where they could not be seen."""

    # the model
    arch: str | None = None  # config.model_type: llama, mistral, qwen2, ...
    num_layers: int | None = None
    hidden_size: int | None = None
    intermediate_size: int | None = None
    vocab_size: int | None = None
    num_heads: int | None = None
    num_kv_heads: int | None = None
    attention: str | None = None  # config._attn_implementation: sdpa, eager, flash_attention_2
    training: bool | None = None  # model.training when the step ran
    use_cache: bool | None = None
    gradient_checkpointing: bool | None = None  # enabled on the model
    checkpointing_effective: bool | None = None  # decoder layers were recomputed in backward
    # dtypes, as observed in a forward pass (torch dtype names: "float32", "bfloat16")
    weight_dtype: str | None = None  # of the non-quantized floating parameters (most bytes)
    compute_dtype: str | None = None  # bitsandbytes compute dtype, else weight_dtype
    hidden_dtype: str | None = None  # decoder layers' output
    logits_dtype: str | None = None
    autocast: str | None = None  # autocast dtype active in the forward, if any
    # quantization
    quant: str | None = None  # nf4, fp4, int8, or None
    double_quant: bool | None = None
    linear_layers: int = 0  # linear layers in the decoder (quantized or not)
    quantized_layers: int = 0  # of them, 4-bit or 8-bit
    # LoRA
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_targets: list[str] = field(default_factory=list)  # module names targeted, e.g. q_proj, v_proj
    lora_modules: int = 0  # LoRA-wrapped layers
    lora_params: int = 0
    # parameters and optimizer
    total_params: int = 0
    trainable_params: int = 0
    trainable_bytes: int = 0
    weight_bytes: int = 0  # bytes of all parameters and buffers (quantized storage and statistics)
    optimizer: str | None = None  # class name: AdamW, AdamW8bit, PagedAdamW8bit, SGD, ...
    optimizer_state_bytes: int | None = None  # bytes of its state after a step, where seen
    # inputs
    batch: int | None = None
    seq: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
