"""Random-weight checkpoints of the presets (:mod:`pytest_gpumem.models.presets`), and loading them as
production code does.

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
from pathlib import Path
from typing import Any

from pytest_gpumem.models.presets import _DTYPE_OF_QUANT, preset


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
            "import sys, torch; from pytest_gpumem.models.loading import make_checkpoint; "
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
