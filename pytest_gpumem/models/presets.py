"""Model presets: published models' configurations (hidden size, layers, heads, key/value heads,
intermediate size, vocabulary), by architecture and size. Memory depends on shapes and dtypes, not on
values, so a preset and random weights stand for the real model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

QUANTS = ("nf4", "fp4", "int8", "bf16", "fp16", "fp32")
COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
_DTYPE_OF_QUANT = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

_TINY = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1024,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


@dataclass(frozen=True)
class Preset:
    """A model shape: the architecture, a size name, the published model it copies, and its config."""

    arch: str
    size: str
    source: str
    config: dict[str, Any]


def _presets() -> dict[str, dict[str, Preset]]:
    table: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
        "llama": {
            "tiny": ("tiny Llama (2 layers)", _TINY),
            "1b": (
                "meta-llama/Llama-3.2-1B",
                dict(
                    hidden_size=2048,
                    intermediate_size=8192,
                    num_hidden_layers=16,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    vocab_size=128256,
                    tie_word_embeddings=True,
                    head_dim=64,
                    rope_theta=500000.0,
                    max_position_embeddings=131072,
                ),
            ),
            "3b": (
                "meta-llama/Llama-3.2-3B",
                dict(
                    hidden_size=3072,
                    intermediate_size=8192,
                    num_hidden_layers=28,
                    num_attention_heads=24,
                    num_key_value_heads=8,
                    vocab_size=128256,
                    tie_word_embeddings=True,
                    head_dim=128,
                    rope_theta=500000.0,
                    max_position_embeddings=131072,
                ),
            ),
            "8b": (
                "meta-llama/Llama-3.1-8B",
                dict(
                    hidden_size=4096,
                    intermediate_size=14336,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    vocab_size=128256,
                    tie_word_embeddings=False,
                    head_dim=128,
                    rope_theta=500000.0,
                    max_position_embeddings=131072,
                ),
            ),
        },
        "mistral": {
            "tiny": ("tiny Mistral (2 layers)", {**_TINY, "sliding_window": None}),
            "7b": (
                "mistralai/Mistral-7B-v0.3",
                dict(
                    hidden_size=4096,
                    intermediate_size=14336,
                    num_hidden_layers=32,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    vocab_size=32768,
                    tie_word_embeddings=False,
                    head_dim=128,
                    sliding_window=None,
                    max_position_embeddings=32768,
                ),
            ),
            "8b": (
                "mistralai/Ministral-8B-Instruct-2410",
                dict(
                    hidden_size=4096,
                    intermediate_size=12288,
                    num_hidden_layers=36,
                    num_attention_heads=32,
                    num_key_value_heads=8,
                    vocab_size=131072,
                    tie_word_embeddings=False,
                    head_dim=128,
                    sliding_window=None,
                    max_position_embeddings=32768,
                ),
            ),
        },
        "qwen2": {
            "tiny": ("tiny Qwen2 (2 layers)", _TINY),
            "0.5b": (
                "Qwen/Qwen2.5-0.5B",
                dict(
                    hidden_size=896,
                    intermediate_size=4864,
                    num_hidden_layers=24,
                    num_attention_heads=14,
                    num_key_value_heads=2,
                    vocab_size=151936,
                    tie_word_embeddings=True,
                    max_position_embeddings=32768,
                ),
            ),
            "1.5b": (
                "Qwen/Qwen2.5-1.5B",
                dict(
                    hidden_size=1536,
                    intermediate_size=8960,
                    num_hidden_layers=28,
                    num_attention_heads=12,
                    num_key_value_heads=2,
                    vocab_size=151936,
                    tie_word_embeddings=True,
                    max_position_embeddings=32768,
                ),
            ),
            "3b": (
                "Qwen/Qwen2.5-3B",
                dict(
                    hidden_size=2048,
                    intermediate_size=11008,
                    num_hidden_layers=36,
                    num_attention_heads=16,
                    num_key_value_heads=2,
                    vocab_size=151936,
                    tie_word_embeddings=True,
                    max_position_embeddings=32768,
                ),
            ),
            "7b": (
                "Qwen/Qwen2.5-7B",
                dict(
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    vocab_size=152064,
                    tie_word_embeddings=False,
                    max_position_embeddings=32768,
                ),
            ),
        },
    }
    return {
        arch: {size: Preset(arch, size, source, config) for size, (source, config) in sizes.items()}
        for arch, sizes in table.items()
    }


PRESETS = _presets()


def preset(arch: str, size: str) -> Preset:
    """The preset of ``arch`` and ``size``; ValueError listing the valid ones otherwise."""
    if arch not in PRESETS:
        raise ValueError(f"quantized_model: unknown architecture {arch!r}; choose one of {', '.join(PRESETS)}")
    if size not in PRESETS[arch]:
        raise ValueError(f"quantized_model: unknown size {size!r} for {arch}; choose one of {', '.join(PRESETS[arch])}")
    return PRESETS[arch][size]


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"quantized_model: unknown {name} {value!r}; choose one of {', '.join(choices)}")
