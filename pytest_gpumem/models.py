"""Model presets, random-weight checkpoints, and loading them as production code does.

Weights cannot be downloaded in CI, and need not be: memory depends on shapes
and dtypes, not on values. A preset is a published model's configuration (its
hidden size, layers, heads, key/value heads, intermediate size, vocabulary);
its checkpoint is made once, with seeded random weights, saved with
``save_pretrained``, and then every test loads it through the real
``from_pretrained`` path, with a ``BitsAndBytesConfig`` where quantized.
transformers, peft and bitsandbytes are imported only when used.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
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


def checkpoint_path(root: Path, arch: str, size: str, dtype: str) -> Path:
    return root / f"{arch}-{size}-{dtype}"


def make_checkpoint(root: Path | str, arch: str, size: str, dtype: str = "bfloat16", device: str | None = None) -> Path:
    """The directory of a random-weight checkpoint of the preset, made on ``device`` if missing.

    Seeded, so the same preset always gives the same bytes. Written next to
    its final place and renamed into it, so that a half-written checkpoint is
    never loaded, and parallel workers making the same one do not collide.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape = preset(arch, size)
    root = Path(root)
    path = checkpoint_path(root, arch, size, dtype)
    if (path / "config.json").is_file():
        return path
    config = AutoConfig.for_model(arch, **shape.config, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    staging = root / f".{path.name}.{os.getpid()}"
    model.save_pretrained(staging)
    del model
    try:
        os.rename(staging, path)
    except OSError:  # another worker made it first
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_checkpoint(root: Path, arch: str, size: str, dtype: str = "bfloat16") -> Path:
    """:func:`make_checkpoint`, in a child process when the checkpoint is missing.

    The child generates on the GPU where there is one (seconds, even for 8B);
    the measured process only ever loads, which is what a test measures.
    """
    preset(arch, size)
    path = checkpoint_path(root, arch, size, dtype)
    if not (path / "config.json").is_file():
        code = (
            "import sys, torch; from pytest_gpumem.models import make_checkpoint; "
            "make_checkpoint(*sys.argv[1:5], device='cuda' if torch.cuda.is_available() else 'cpu')"
        )
        done = subprocess.run(
            [sys.executable, "-c", code, str(root), arch, size, dtype], capture_output=True, text=True
        )
        if done.returncode != 0:
            raise RuntimeError(f"could not make the {arch} {size} checkpoint in {root}: {done.stderr[-2000:]}")
    return path


def quantization_config(quant: str, double_quant: bool, compute_dtype: str) -> Any:
    """The BitsAndBytesConfig of a quant (None for the unquantized dtypes)."""
    import torch
    from transformers import BitsAndBytesConfig

    if quant in ("nf4", "fp4"):
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant,
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=getattr(torch, compute_dtype),
        )
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return None


def load(path: Path | str, quant: str, double_quant: bool, compute_dtype: str, device_map: Any) -> Any:
    """``from_pretrained`` as production code calls it; the KV cache is off, as it is for training."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = _DTYPE_OF_QUANT.get(quant, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(
        path,
        quantization_config=quantization_config(quant, double_quant, compute_dtype),
        dtype=getattr(torch, dtype),
        device_map=device_map,
    )
    model.config.use_cache = False
    return model


_CHECKPOINTING = {"use_reentrant": False}  # transformers' own default, which peft would override with {}


@contextmanager
def _quiet_checkpointing_aliases() -> Iterator[None]:
    """peft calls transformers 5's deprecated checkpointing aliases; nothing for the user to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.* is deprecated", category=FutureWarning)
        yield


def set_gradient_checkpointing(model: Any, enabled: bool) -> None:
    """Turn gradient checkpointing on or off (through a peft wrapper too)."""
    with _quiet_checkpointing_aliases():
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_CHECKPOINTING)
            model.enable_input_require_grads()
        else:
            model.gradient_checkpointing_disable()


def gradient_checkpointing_enabled(model: Any) -> bool:
    """Whether gradient checkpointing is on, by transformers' own definition (some module's flag is set),
    without its renamed and deprecated properties (``is_gradient_checkpointing`` in transformers 5)."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def is_quantized(model: Any) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def add_lora(
    model: Any,
    r: int = 8,
    alpha: int | None = None,
    target_modules: str | list[str] = "all-linear",
    dropout: float = 0.0,
    gradient_checkpointing: bool = True,
    seed: int = 0,
) -> Any:
    """A peft LoRA model ready to train, prepared as QLoRA recipes prepare it.

    Quantized models go through ``prepare_model_for_kbit_training`` (which
    upcasts the non-quantized parameters to float32 and, if asked, enables
    gradient checkpointing); others get checkpointing enabled directly.
    ``alpha`` defaults to ``2 * r``.
    """
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise ValueError(f"lora: r must be a positive int, got {r!r}")
    with _quiet_checkpointing_aliases():
        if is_quantized(model):
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=gradient_checkpointing,
                gradient_checkpointing_kwargs=_CHECKPOINTING,
            )
        elif gradient_checkpointing:
            set_gradient_checkpointing(model, True)
        import torch

        torch.manual_seed(seed)  # LoRA A matrices come from the global generator
        config = LoraConfig(
            r=r, lora_alpha=alpha or 2 * r, target_modules=target_modules, lora_dropout=dropout, task_type="CAUSAL_LM"
        )
        model = get_peft_model(model, config)
    model.config.use_cache = False
    return model
