"""What a test's training setup really is: read from the model, the optimizer and one observed step.

The advisor needs facts, not the user's intentions: whether gradient
checkpointing is enabled *and* recomputes, the dtype hidden states and logits
really have, how many linear layers a quantization config really quantized,
LoRA's rank and targets, the trainable parameters, the optimizer, the inputs'
batch and sequence length. :class:`Probe` watches the forward and backward
passes, :func:`inspect_setup` gathers everything into a :class:`TrainingSetup`,
and :func:`findings` names the settings that are configured but do nothing, or
silently cost memory.

transformers, peft and bitsandbytes are never imported here: a model that uses
them has imported them already, so their classes are looked up in
``sys.modules``, and peft's LoRA layers are recognised by their attributes.
"""

from __future__ import annotations

import math
import sys
import weakref
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pytest_gpumem.models.loading import gradient_checkpointing_enabled

HALF_DTYPES = ("bfloat16", "float16")


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
    use_cache: bool | None = None  # a KV cache came out of a training forward (else: config.use_cache)
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
    # added after the first contract; defaults keep older constructors valid
    head_dim: int | None = None
    matmul_dtype: str | None = None  # dtype the decoder's first linear layer multiplied in (autocast included)
    autocast_requested: str | None = None  # the ``autocast`` knob the test ran with
    unquantized: list[str] = field(default_factory=list)  # decoder linear layers left unquantized, e.g. mlp.gate_proj
    config_dtype: str | None = None  # the dtype the model's config names (config.dtype): what loading it meant
    checkpointing_variant: str | None = None  # reentrant or non-reentrant, read from the model where it checkpoints
    grad_forwards: int | None = None  # forwards run with autograd on, where the forwards were watched
    backward: bool | None = None  # a backward pass reached the model's outputs, where the forwards were watched
    outputs_kept: bool | None = None  # the loop held the model's output (its logits) through backward

    @property
    def inference(self) -> bool:
        """The forwards were watched and no backward reached the outputs: the test infers, it does not train."""
        return self.backward is False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the forward and backward passes


@dataclass
class Observed:
    """What a :class:`Probe` saw of the forward passes run with gradients enabled (the training ones)."""

    forwards: int = 0
    batch: int | None = None  # of the forward with the most tokens
    seq: int | None = None
    training: bool | None = None  # True if any forward ran in train mode
    autocast: str | None = None  # autocast dtype inside the last forward, None without autocast
    hidden_dtype: str | None = None  # the first decoder layer's output
    logits_dtype: str | None = None
    matmul_dtype: str | None = None  # the first decoder linear layer's matmul dtype
    cache_kept: bool | None = None  # a forward returned past_key_values
    backward: bool = False  # a backward pass reached the logits
    outputs_kept: bool | None = None  # the model's output was still referenced when backward reached the logits
    recomputed: bool = False  # a decoder layer ran again during a backward pass


def decoder_layers(model: Any) -> list[Any]:
    """The decoder layers of a (possibly peft-wrapped) transformers model; [] where there are none.

    The longest ``ModuleList`` of modules of one class, preferring lists of
    ``...DecoderLayer`` classes and lists not nested in another candidate's
    elements, so that a mixture of experts' expert list or a vision tower is
    not taken for the decoder.
    """
    if not isinstance(model, torch.nn.Module):
        return []
    candidates = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1
    ]
    outer = [(n, m) for n, m in candidates if not any(n.startswith(o + ".") for o, _ in candidates if o != n)]

    def rank(item: tuple[str, Any]) -> tuple[bool, int]:
        return "DecoderLayer" in type(item[1][0]).__name__, len(item[1])

    return list(max(outer, key=rank)[1]) if outer else []


def dtype_bytes(name: str | None) -> int:
    """Bytes per element of a torch dtype named as the setup names it (``"bfloat16"`` -> 2); 0 if unknown."""
    dtype = getattr(torch, name or "", None)
    return dtype.itemsize if isinstance(dtype, torch.dtype) else 0


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _first_tensor(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    return None


def _is_lora_name(name: str) -> bool:
    return any(part.startswith("lora_") for part in name.split("."))


def _first_linear(layer: Any) -> Any:
    """The first linear layer of a decoder layer, the base layer where LoRA wraps it."""
    for name, module in layer.named_modules():
        if isinstance(module, torch.nn.Linear) and not _is_lora_name(name) and not hasattr(module, "base_layer"):
            return module
    return None


class Probe:
    """Watches a (possibly peft-wrapped) causal LM's forward and backward passes through module hooks.

    Only forwards run with gradients enabled are observed: the input's batch
    and sequence length, ``model.training``, the autocast dtype, the dtypes of
    the decoder's hidden states, of its first matmul and of the logits, and
    whether a KV cache came out. Whether checkpointing recomputes is seen from
    the decoder layers' submodules running during a backward pass: their
    forward *pre*-hooks, because recent transformers checkpoint a layer's
    ``forward`` (so the layer's own hooks do not run again) and non-reentrant
    checkpointing stops recomputing once it has what backward needs (so later
    submodules' post-hooks may never fire). Hooks store dtype names and ints,
    never tensors. ``detach()`` (or leaving the ``with`` block) removes them.
    """

    def __init__(self, model: Any) -> None:
        self.observed = Observed()
        self._handles: list[Any] = []
        self._in_forward = False  # inside the top module's forward, gradients enabled or not
        self._recording = False  # inside a forward that is observed
        self._device = "cpu"
        self._output: Callable[[], Any] = lambda: None  # a weak reference to the latest observed output
        # Set while the autograd engine runs a node: a submodule running then is being recomputed.
        self._current_node = getattr(torch._C, "_current_autograd_node", None)
        if not isinstance(model, torch.nn.Module):
            return
        self._handles.append(model.register_forward_pre_hook(self._before, with_kwargs=True))
        self._handles.append(model.register_forward_hook(self._after, with_kwargs=True, always_call=True))
        layers = decoder_layers(model)
        # Train or eval mode is the decoder layers' (checkpointing asks them): a wrapper made after loading (a
        # PeftModel) starts in train mode around a model that from_pretrained left in eval mode.
        self._mode_of = weakref.ref(layers[0] if layers else model)
        if not layers:
            return
        self._handles.append(layers[0].register_forward_hook(self._layer_output))
        linear = _first_linear(layers[0])
        if linear is not None:
            self._handles.append(linear.register_forward_hook(self._matmul))
        for layer in layers:
            for child in layer.children():
                self._handles.append(child.register_forward_pre_hook(self._submodule_runs))

    def detach(self) -> None:
        """Remove every hook (what was observed stays in :attr:`observed`)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    # hooks

    def _before(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._in_forward = True
        self._recording = torch.is_grad_enabled()
        if not self._recording:
            return
        seen = self.observed
        seen.forwards += 1
        decides = self._mode_of() or module
        seen.training = bool(seen.training) or decides.training
        ids = kwargs.get("input_ids")
        if ids is None and args and isinstance(args[0], torch.Tensor):
            ids = args[0]
        embeds = kwargs.get("inputs_embeds")
        tokens = ids if isinstance(ids, torch.Tensor) else embeds if isinstance(embeds, torch.Tensor) else None
        if tokens is not None and tokens.dim() >= 2:
            # The estimate backend's meta tensors stand for a CUDA device (and meta has no autocast state).
            self._device = "cuda" if tokens.device.type == "meta" else tokens.device.type
            batch, seq = int(tokens.shape[0]), int(tokens.shape[1])
            if seen.batch is None or seen.seq is None or batch * seq > seen.batch * seen.seq:
                seen.batch, seen.seq = batch, seq

    def _after(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        recording = self._recording
        self._in_forward = self._recording = False
        if not recording or output is None or isinstance(output, tuple):
            return
        seen = self.observed
        logits = getattr(output, "logits", None)
        if isinstance(logits, torch.Tensor):
            seen.logits_dtype = _dtype_name(logits.dtype)
            if not seen.backward and logits.requires_grad:
                # Whether the loop still holds the output when its backward begins (``outputs = model(...)``)
                # or let it go (``model(...).loss.backward()``, as Trainer does): its logits live on or not.
                self._output = weakref.ref(output)
                logits.register_hook(self._backward_reached)
        if module.training:
            seen.cache_kept = bool(seen.cache_kept) or getattr(output, "past_key_values", None) is not None

    def _backward_reached(self, grad: Any) -> None:
        self.observed.backward = True
        self.observed.outputs_kept = self._output() is not None

    def _layer_output(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        if not self._recording:
            return
        hidden = _first_tensor(output)
        if hidden is not None:
            self.observed.hidden_dtype = _dtype_name(hidden.dtype)
        # Read inside the model: Trainer (accelerate) enters autocast in a wrapped forward, after the top hooks.
        enabled = torch.is_autocast_enabled(self._device)
        self.observed.autocast = _dtype_name(torch.get_autocast_dtype(self._device)) if enabled else None

    def _matmul(self, module: Any, args: tuple[Any, ...], output: Any) -> None:
        if not self._recording:
            return
        if type(module).__name__ == "Linear8bitLt":
            self.observed.matmul_dtype = "int8"
        elif hasattr(module, "compute_dtype"):  # bitsandbytes 4-bit: computes in compute_dtype, else the input's
            inputs = _first_tensor(args)
            dtype = module.compute_dtype or (inputs.dtype if inputs is not None else None)
            self.observed.matmul_dtype = _dtype_name(dtype) if dtype is not None else None
        elif isinstance(output, torch.Tensor):  # a plain linear's output has its matmul's dtype, autocast or not
            self.observed.matmul_dtype = _dtype_name(output.dtype)

    def _submodule_runs(self, module: Any, args: tuple[Any, ...]) -> None:
        if self.observed.recomputed or self._in_forward:
            return
        if self._current_node is None or self._current_node() is not None:
            self.observed.recomputed = True


# -- the model, the optimizer, the knobs


def inspect_setup(
    models: list[Any], optimizers: list[Any], knobs: dict[str, Any], probe: Probe | None = None
) -> TrainingSetup:
    """The facts of a training setup: from the first of ``models`` (the one trained), the weights of all of
    them, the ``optimizers``' state, the ``knobs`` the test ran with, and what ``probe`` saw of its step."""
    setup = TrainingSetup()
    model = models[0] if models else None
    if isinstance(model, torch.nn.Module):
        _read_config(setup, model)
        setup.gradient_checkpointing = gradient_checkpointing_enabled(model)
        setup.checkpointing_variant = checkpointing_variant(model)
        _read_layers(setup, model)
        _read_lora(setup, model)
        _read_dtypes(setup, model)
    _read_parameters(setup, [m for m in models if isinstance(m, torch.nn.Module)])
    read_optimizers(setup, optimizers)
    return add_observed(setup, knobs, probe)


def add_observed(setup: TrainingSetup, knobs: dict[str, Any], probe: Probe | None) -> TrainingSetup:
    """``setup`` with the ``knobs`` the test ran with and what ``probe`` saw of its step (mode, autocast,
    dtypes, the KV cache, whether checkpointing recomputed, the batch and sequence)."""
    setup.autocast_requested = knobs.get("autocast")
    seen = probe.observed if probe is not None and probe.observed.forwards else None
    if seen is not None:
        setup.training = seen.training
        setup.autocast = seen.autocast
        setup.hidden_dtype = seen.hidden_dtype
        setup.logits_dtype = seen.logits_dtype
        setup.matmul_dtype = seen.matmul_dtype
        if seen.cache_kept is not None:
            setup.use_cache = seen.cache_kept
        if seen.recomputed or seen.backward:
            setup.checkpointing_effective = seen.recomputed
            setup.outputs_kept = seen.outputs_kept
    setup.batch = knobs["batch"] if knobs.get("batch") is not None else seen.batch if seen else None
    setup.seq = knobs["seq"] if knobs.get("seq") is not None else seen.seq if seen else None
    return setup


def checkpointing_variant(model: Any) -> str | None:
    """The gradient checkpointing in effect in ``model``, read from it: ``reentrant``, ``non-reentrant``, or
    None where no layer checkpoints (a peft wrapper is read through)."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            function = getattr(module, "_gradient_checkpointing_func", None)
            keywords = getattr(function, "keywords", None) or {}
            # torch.utils.checkpoint's default, where nothing is passed, is reentrant.
            return "non-reentrant" if keywords.get("use_reentrant") is False else "reentrant"
    return None


def _get(config: Any, name: str) -> Any:
    return config.get(name) if isinstance(config, dict) else getattr(config, name, None)


def _read_config(setup: TrainingSetup, model: Any) -> None:
    config = getattr(model, "config", None)
    if config is None:
        return
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else config
    setup.arch = getattr(config, "model_type", None) or None
    setup.num_layers = getattr(text, "num_hidden_layers", None)
    setup.hidden_size = getattr(text, "hidden_size", None)
    setup.intermediate_size = getattr(text, "intermediate_size", None)
    setup.vocab_size = getattr(text, "vocab_size", None)
    setup.num_heads = getattr(text, "num_attention_heads", None)
    setup.num_kv_heads = getattr(text, "num_key_value_heads", None) or setup.num_heads
    setup.head_dim = getattr(text, "head_dim", None) or (
        setup.hidden_size // setup.num_heads if setup.hidden_size and setup.num_heads else None
    )
    setup.attention = getattr(config, "_attn_implementation", None)
    dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None)
    setup.config_dtype = _dtype_name(dtype) if isinstance(dtype, torch.dtype) else (str(dtype) if dtype else None)
    setup.use_cache = getattr(text, "use_cache", None)
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = str(_get(quantization, "quant_method") or "")
        if _get(quantization, "load_in_4bit"):
            setup.quant = str(_get(quantization, "bnb_4bit_quant_type") or "fp4")
            setup.double_quant = bool(_get(quantization, "bnb_4bit_use_double_quant"))
            compute = _get(quantization, "bnb_4bit_compute_dtype")
            setup.compute_dtype = _dtype_name(compute) if compute is not None else None
        elif _get(quantization, "load_in_8bit"):
            setup.quant = "int8"
        elif method:
            setup.quant = method.removeprefix("QuantizationMethod.").lower()


def _bnb() -> Any:
    """bitsandbytes, if some model imported it (a model without it has none of its layers)."""
    return sys.modules.get("bitsandbytes")


def _read_layers(setup: TrainingSetup, model: Any) -> None:
    """Count the decoder's linear layers and how many of them bitsandbytes quantized.

    A linear layer is a ``torch.nn.Linear`` (bitsandbytes' layers are ones), the
    base layer where LoRA wraps one, or a 3-D weight of another module: the
    fused experts of transformers 5's mixtures of experts, which 4-bit loading
    leaves in 16 bits. LoRA's own matrices are not counted.
    """
    bnb = _bnb()
    four_bit = (bnb.nn.Linear4bit,) if bnb is not None else ()
    eight_bit = (bnb.nn.Linear8bitLt,) if bnb is not None else ()
    params4 = (bnb.nn.Params4bit,) if bnb is not None else ()
    unquantized: dict[str, int] = {}
    first = None  # the first quantized linear layer
    for layer in decoder_layers(model):
        for name, module in layer.named_modules():
            if _is_lora_name(name) or hasattr(module, "base_layer"):
                continue
            label = name.removesuffix(".base_layer")
            if isinstance(module, torch.nn.Linear):
                setup.linear_layers += 1
                if isinstance(module, four_bit + eight_bit):
                    setup.quantized_layers += 1
                    if first is None:
                        first = module
                else:
                    unquantized[label] = unquantized.get(label, 0) + 1
                continue
            for pname, param in module.named_parameters(recurse=False):
                if isinstance(param, params4):
                    setup.linear_layers += 1
                    setup.quantized_layers += 1
                elif param.dim() == 3 and param.is_floating_point():
                    setup.linear_layers += 1
                    key = f"{label}.{pname}" if label else pname
                    unquantized[key] = unquantized.get(key, 0) + 1
    if first is not None or setup.quant is not None:  # in a model that is not quantized, that is everything
        setup.unquantized = sorted(unquantized)
    # What the layers hold overrides what the config asked for.
    if isinstance(first, eight_bit):
        setup.quant = "int8"
    elif first is not None:
        state = getattr(first.weight, "quant_state", None)
        if state is not None:
            setup.quant = str(state.quant_type)
            setup.double_quant = bool(getattr(state, "nested", False))
        if first.compute_dtype is not None:
            setup.compute_dtype = _dtype_name(first.compute_dtype)


def _read_lora(setup: TrainingSetup, model: Any) -> None:
    configs = getattr(model, "peft_config", None)
    if isinstance(configs, dict) and configs:
        active = getattr(model, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) and active else active
        config = configs.get(active) or next(iter(configs.values()))
        if hasattr(config, "lora_alpha"):
            setup.lora_r = getattr(config, "r", None)
            setup.lora_alpha = config.lora_alpha
    targets: set[str] = set()
    for name, module in model.named_modules():
        if hasattr(module, "base_layer") and isinstance(getattr(module, "lora_A", None), torch.nn.ModuleDict):
            setup.lora_modules += 1
            targets.add(name.rsplit(".", 1)[-1])
    setup.lora_targets = sorted(targets)
    setup.lora_params = sum(p.numel() for name, p in model.named_parameters() if _is_lora_name(name))


def _is_quantized(param: Any) -> bool:
    return hasattr(param, "quant_state") or type(param).__name__ in ("Params4bit", "Int8Params")


def _logical_numel(param: Any) -> int:
    """Parameters a weight stands for: a 4-bit weight packs two per byte, its quant_state has the shape."""
    shape = getattr(getattr(param, "quant_state", None), "shape", None)
    return math.prod(shape) if shape is not None else int(param.numel())


def _read_dtypes(setup: TrainingSetup, model: Any) -> None:
    by_dtype: dict[str, int] = {}
    for param in model.parameters():
        if param.is_floating_point() and not _is_quantized(param):
            name = _dtype_name(param.dtype)
            by_dtype[name] = by_dtype.get(name, 0) + param.nbytes
    if by_dtype:
        setup.weight_dtype = max(by_dtype, key=lambda name: by_dtype[name])
    if setup.compute_dtype is None or setup.quant not in ("nf4", "fp4"):
        setup.compute_dtype = setup.weight_dtype


def quantization_statistics(param: Any, module: Any) -> list[Any]:
    """The tensors a quantized weight needs besides its packed storage: absmax, code, nested state, SCB."""
    found: list[Any] = []
    state = getattr(param, "quant_state", None)
    while state is not None:
        found += [getattr(state, name, None) for name in ("absmax", "code", "offset")]
        state = getattr(state, "state2", None)
    found.append(getattr(param, "SCB", None))
    int8_state = getattr(module, "state", None)
    found += [getattr(int8_state, name, None) for name in ("SCB", "CB")]
    return [t for t in found if isinstance(t, torch.Tensor)]


def _tensor_key(tensor: Any) -> tuple[Any, ...]:
    # Tied weights share data; tensors without data (meta) are told apart by identity.
    ptr = tensor.data_ptr() if tensor.device.type != "meta" else 0
    return (tensor.device, ptr, tensor.nbytes) if ptr else ("id", id(tensor))


def _read_parameters(setup: TrainingSetup, models: list[Any]) -> None:
    seen_params: set[int] = set()
    tensors: dict[tuple[Any, ...], int] = {}
    for model in models:
        for module in model.modules():
            for param in module.parameters(recurse=False):
                if id(param) in seen_params:
                    continue
                seen_params.add(id(param))
                numel = _logical_numel(param)
                setup.total_params += numel
                if param.requires_grad:
                    setup.trainable_params += numel
                    setup.trainable_bytes += param.nbytes
                for tensor in [param, *quantization_statistics(param, module)]:
                    tensors[_tensor_key(tensor)] = tensor.nbytes
            for buffer in module.buffers(recurse=False):
                tensors[_tensor_key(buffer)] = buffer.nbytes
    setup.weight_bytes = sum(tensors.values())


def _unwrap(optimizer: Any) -> Any:
    """The optimizer inside accelerate's AcceleratedOptimizer (Trainer's), else itself."""
    inner = getattr(optimizer, "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else optimizer


def read_optimizers(setup: TrainingSetup, optimizers: list[Any]) -> None:
    if not optimizers:
        return
    unwrapped = [_unwrap(o) for o in optimizers]
    setup.optimizer = type(unwrapped[0]).__name__
    tensors: dict[tuple[Any, ...], int] = {}
    for optimizer in unwrapped:
        for state in getattr(optimizer, "state", {}).values():
            for value in state.values() if isinstance(state, dict) else ():
                if isinstance(value, torch.Tensor):
                    tensors[_tensor_key(value)] = value.nbytes
    # An empty state is an optimizer not stepped yet (or a stateless one): nothing seen to count.
    setup.optimizer_state_bytes = sum(tensors.values()) if any(getattr(o, "state", None) for o in unwrapped) else None


# -- what is configured but does nothing
