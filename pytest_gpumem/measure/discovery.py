"""Find the models and optimizers a test trains, with nothing registered by the test.

A user's test runs its own loop: it builds a model, maybe wraps it with peft,
calls it, steps an optimizer. To explain that test's memory, the plugin needs
to know which models ran, how (gradients, modes, autocast, batch and
sequence) and whether a backward pass went through them, without asking the
test to hand anything over. :class:`Discovery` installs torch's *global*
module forward hooks and its global optimizer step pre-hook for as long as
it runs, and so sees:

* every **top-level** module forward: one that starts on a thread while no
  other module forward is running on it. The ``PeftModel`` is found, not the
  ``LlamaForCausalLM`` inside it; a teacher and a student called one after the
  other are both found. Modules without parameters (a loss module called by
  the loop) are counted but are not models. A forward that runs while the
  autograd engine executes a node (gradient checkpointing recomputing a
  layer in backward) is not top-level.
* per model, a :class:`ForwardCalls`: what its forwards were called with and
  under which modes, and whether a backward pass reached an output;
* every optimizer stepped.

When a forward raises, torch runs the forward hook without the keyword
arguments: that forward's batch and sequence come from its positional
inputs only. A forward already running when :meth:`Discovery.start` is
called is not seen. ``torch.compile(model)`` returns a wrapper module: that is the model found
(its ``model_class`` and ``kind`` are the compiled model's), and torch warns
at each of its calls that global hooks are installed.

Each model gets an :class:`~pytest_gpumem.measure.introspect.Probe` at its first
forward, which also observes that very forward (see :func:`_replay`).

Everything is held by weak reference: discovery never keeps alive what the
test frees. Hooks store ints, bools and names, never tensors.

Cost: every module call in the process pays while discovery runs. A global
hook makes ``Module.__call__`` leave its no-hook fast path, and each
submodule call then runs the two hooks below, which return after a
thread-local depth update. Measured on a shared CPU (torch 2.13, timeit of
``nn.Identity`` called as a submodule): 0.7 us a call without hooks, 1.95 us
with two global no-op hooks (torch's slow path), 2.2 us with discovery's:
about 0.25 us of it is discovery's own, 1.5 us in all. A tiny Llama forward
(2 layers, 32 module calls, 0.8 ms) takes 0.1 to 0.2 ms longer, its probe's
hooks included.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import weakref
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_pre_hook

from pytest_gpumem.measure.introspect import Probe, TrainingSetup, inspect_setup, read_optimizers

# Set while the autograd engine runs a node: a module forward then is a recomputation, not the test's call.
_current_node = getattr(torch._C, "_current_autograd_node", None)

_TOKEN_KWARGS = ("input_ids", "inputs_embeds")
_OUTPUT_TENSORS = ("logits", "loss")


@dataclass
class ForwardCalls:
    """What one top-level model's forwards were called with, and under which modes.

    ``forwards`` counts every call; ``grad_forwards``, ``no_grad_forwards``
    (grad disabled, as under ``torch.no_grad()``) and ``inference_forwards``
    (``torch.inference_mode()``) split them. ``batch`` and ``seq`` are the
    shape of the forward with the most tokens: of ``input_ids``, else
    ``inputs_embeds``, else the first tensor argument, else the first tensor
    keyword argument: ``shape[0]``, and ``shape[1]`` where it has two
    dimensions or more (for a plain module that is whatever its second
    dimension means; ``seq`` stays None for 1-D inputs). ``tokens`` sums
    batch x seq (batch alone for 1-D inputs) over the forwards.
    """

    model_class: str
    kind: str  # "peft" (a peft PeftModel), "transformers" (a PreTrainedModel) or "module"
    forwards: int = 0
    grad_forwards: int = 0
    no_grad_forwards: int = 0
    inference_forwards: int = 0
    raised: int = 0  # forwards that raised (an out-of-memory error, say)
    batch: int | None = None
    seq: int | None = None
    tokens: int = 0
    train_mode: bool = False  # some forward ran with model.training True
    eval_mode: bool = False  # some forward ran with model.training False
    autocast_forwards: int = 0
    autocast: str | None = None  # autocast dtype of the last forward run under autocast ("bfloat16")
    backward: bool = False  # a backward pass reached an output of some forward


@dataclass
class Found:
    """A model discovery found: the model itself while alive (None once the test freed it), its calls,
    its probe, what was read of it at its first forwards, and its config."""

    model: Any
    calls: ForwardCalls
    probe: Probe | None
    setup: TrainingSetup | None
    config: Any


def model_kind(model: Any) -> str:
    """``"peft"``, ``"transformers"`` or ``"module"``.

    Looked up in ``sys.modules``: a model of these libraries has imported them
    already, and discovery must neither import them nor need them installed.
    """
    peft = sys.modules.get("peft.peft_model")
    peft_model = getattr(peft, "PeftModel", None)
    if isinstance(peft_model, type) and isinstance(model, peft_model):
        return "peft"
    modeling = sys.modules.get("transformers.modeling_utils")
    pretrained = getattr(modeling, "PreTrainedModel", None)
    if isinstance(pretrained, type) and isinstance(model, pretrained):
        return "transformers"
    return "module"


class _ThreadState(threading.local):
    # Class attributes are each thread's starting values.
    depth = 0  # module forwards running on this thread
    top: _Record | None = None  # the top-level forward's record; None while recomputing in backward


class _Record:
    """One top-level module: weakly held, with its calls and its probe."""

    __slots__ = ("calls", "config", "device", "is_model", "order", "probe", "ref", "replayed", "setup")

    def __init__(self, module: torch.nn.Module, order: int) -> None:
        self.ref = weakref.ref(module)
        named = _compiled_module(module)
        self.calls = ForwardCalls(type(named).__name__, model_kind(named))
        self.order = order
        # A module without parameters (a loss, an activation) is a call, not a model: no probe.
        first = next(module.parameters(), None)
        self.is_model = first is not None
        self.device = _autocast_device(first.device) if first is not None else "cpu"
        self.probe: Probe | None = None
        self.replayed = False  # the probe's pre-hook was run by hand for the forward now running
        # Read at the end of its first forwards, while it is alive: a test's own model is freed when the
        # test function returns, before the advisor asks.
        self.setup: TrainingSetup | None = None
        self.config: Any = None

    def backward_reached(self, grad: Any) -> None:
        self.calls.backward = True


def _compiled_module(module: torch.nn.Module) -> Any:
    """The module ``torch.compile`` wrapped, for its class and kind; ``module`` itself when not compiled.

    The wrapper is what the test calls, so it stays the model found.
    """
    dynamo = sys.modules.get("torch._dynamo.eval_frame")
    wrapper = getattr(dynamo, "OptimizedModule", None)
    if isinstance(wrapper, type) and isinstance(module, wrapper):
        return getattr(module, "_orig_mod", module)
    return module


def _autocast_device(device: torch.device) -> str:
    # The estimate backend's meta tensors stand for a CUDA device, as in the probe (meta has no autocast state).
    return "cuda" if device.type == "meta" else device.type


def _autocast_dtype(device: str) -> str | None:
    try:
        enabled = torch.is_autocast_enabled(device)
    except RuntimeError:  # a device type autocast does not know: never break the test's forward for it
        return None
    return str(torch.get_autocast_dtype(device)).removeprefix("torch.") if enabled else None


def _inputs(args: tuple[Any, ...], kwargs: dict[str, Any] | None) -> torch.Tensor | None:
    if kwargs:
        for name in _TOKEN_KWARGS:
            value = kwargs.get(name)
            if isinstance(value, torch.Tensor):
                return value
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    for value in (kwargs or {}).values():
        if isinstance(value, torch.Tensor):
            return value
    return None


def _grad_output(output: Any) -> torch.Tensor | None:
    """The output a backward pass goes through: the tensor, ``.logits`` else ``.loss``, a tuple's first one
    that requires grad; None where no output requires grad."""
    if isinstance(output, torch.Tensor):
        return output if output.requires_grad else None
    if isinstance(output, (tuple, list)):
        return next((v for v in output if isinstance(v, torch.Tensor) and v.requires_grad), None)
    for name in _OUTPUT_TENSORS:
        value = output.get(name) if isinstance(output, dict) else getattr(output, name, None)
        if isinstance(value, torch.Tensor) and value.requires_grad:
            return value
    return None


def _replay(probe: Probe, module: torch.nn.Module, args: tuple[Any, ...], device: str) -> None:
    """Run the probe's forward pre-hook by hand for the forward during which it was attached.

    torch snapshots a module's forward pre-hooks before running the first of
    them (the global ones), so a pre-hook registered from the global pre-hook
    runs from the next call on, while the probe's other hooks (its forward
    hook, the decoder layers') already run in this one. A test that runs one
    step would otherwise leave the probe blind. Global pre-hooks get no
    keyword arguments: the device comes from the positional inputs or the
    parameters, and tokens passed as ``input_ids=`` are filled in after the
    forward (:meth:`Discovery._after`).
    """
    probe._device = device
    probe._before(module, args, {})


class Discovery:
    """Finds the top-level models a test runs and the optimizers it steps, between start() and stop().

    Use it as a context manager, or call :meth:`start` and :meth:`stop`;
    what was found stays readable after :meth:`stop`, and :meth:`start`
    again starts afresh.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self._records: dict[int, _Record] = {}
        self._optimizers: dict[int, weakref.ref[Any]] = {}
        self._seen = 0  # top-level modules seen: their order, for ties in tokens
        self._local = _ThreadState()

    # running

    def start(self) -> None:
        """Install the global hooks (a no-op while running)."""
        if self._handles:
            return
        self._records = {}
        self._optimizers = {}
        self._seen = 0
        self._local = _ThreadState()  # a forward left running by an earlier stop() must not count
        self._handles = [
            register_module_forward_pre_hook(self._before),
            # always_call: a forward that raises still ends, so the next call is top-level again.
            register_module_forward_hook(self._after, with_kwargs=True, always_call=True),
            register_optimizer_step_pre_hook(self._stepped),
        ]

    def stop(self) -> None:
        """Remove every hook installed, global ones and the probes'; safe to call twice or before start()."""
        # torch's handle forgets the global forward hook's with_kwargs entry; left there, it would keep
        # torch believing global hooks are installed (torch.compile warns about them on every call).
        with_kwargs = getattr(torch.nn.modules.module, "_global_forward_hooks_with_kwargs", None)
        for handle in self._handles:
            handle.remove()
            if isinstance(with_kwargs, dict):
                with_kwargs.pop(handle.id, None)
        self._handles = []
        for record in list(self._records.values()):
            if record.probe is not None:
                record.probe.detach()

    def __enter__(self) -> Discovery:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # what was found

    @property
    def models(self) -> list[Any]:
        """The top-level models still alive, the one trained first.

        Ordered by tokens through them, most first; on a tie (a teacher and
        its student see the same batches) a model a backward pass reached,
        then one run with gradients, comes first, then the first seen.
        """
        alive = [
            (record.calls, record.order, model)
            for record in list(self._records.values())
            if record.is_model and (model := record.ref()) is not None
        ]
        alive.sort(key=lambda item: (-item[0].tokens, not item[0].backward, not item[0].grad_forwards, item[1]))
        return [model for _, _, model in alive]

    @property
    def optimizers(self) -> list[Any]:
        """The optimizers stepped and still alive, in the order of their first step."""
        return [o for ref in list(self._optimizers.values()) if (o := ref()) is not None]

    def probe(self, model: Any) -> Probe | None:
        """The probe attached to ``model`` at its first top-level forward; None for a model not found."""
        record = self._find(model)
        return record.probe if record is not None else None

    def calls(self, model: Any) -> ForwardCalls | None:
        """``model``'s top-level forwards (updated while discovery runs); None for a module not found."""
        record = self._find(model)
        return record.calls if record is not None else None

    def summary(self) -> list[dict[str, Any]]:
        """JSON-able, per model as :attr:`models` orders them: its :class:`ForwardCalls` fields and the class
        names of the optimizers stepping some of its parameters (``optimizers``)."""
        optimizers = [(type(o).__name__, _parameter_ids(o)) for o in self.optimizers]
        found = []
        for model in self.models:
            calls = self.calls(model)
            if calls is None:
                continue
            own = {id(p) for p in model.parameters()}
            found.append({**asdict(calls), "optimizers": [name for name, ids in optimizers if ids & own]})
        return found

    def trained(self) -> Found | None:
        """The model trained first (as :attr:`models` orders them), alive or not: what was read of it at its
        first forwards, its calls and its probe. None where no model ran."""
        records = [record for record in list(self._records.values()) if record.is_model]
        if not records:
            return None
        records.sort(key=lambda r: (-r.calls.tokens, not r.calls.backward, not r.calls.grad_forwards, r.order))
        record = records[0]
        return Found(record.ref(), record.calls, record.probe, record.setup, record.config)

    def _optimizers_of(self, module: torch.nn.Module) -> list[Any]:
        own = {id(p) for p in module.parameters()}
        return [o for o in self.optimizers if _parameter_ids(o) & own]

    def _find(self, model: Any) -> _Record | None:
        record = self._records.get(id(model))
        return record if record is not None and record.ref() is model else None

    def _record(self, module: torch.nn.Module, args: tuple[Any, ...]) -> _Record:
        record = self._find(module)
        if record is not None:
            return record
        # First sight. Forget the dead, whose ids may be reused.
        for key, old in list(self._records.items()):
            if old.ref() is None:
                del self._records[key]
        record = _Record(module, self._seen)
        self._seen += 1
        if record.is_model:
            inputs = _inputs(args, None)
            device = _autocast_device(inputs.device) if inputs is not None else record.device
            record.probe = Probe(module)
            _replay(record.probe, module, args, device)
            record.replayed = True
        self._records[id(module)] = record
        return record

    # hooks: most calls are submodules', which return at once

    def _before(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        local = self._local
        depth = local.depth
        local.depth = depth + 1
        if depth:
            return
        if _current_node is not None and _current_node() is not None:
            local.top = None
            return
        record = local.top = self._record(module, args)
        calls = record.calls
        calls.forwards += 1
        if torch.is_inference_mode_enabled():
            calls.inference_forwards += 1
        elif torch.is_grad_enabled():
            calls.grad_forwards += 1
        else:
            calls.no_grad_forwards += 1
        if module.training:
            calls.train_mode = True
        else:
            calls.eval_mode = True

    def _after(self, module: torch.nn.Module, args: tuple[Any, ...], *rest: Any) -> None:
        # (kwargs, output) normally; (output,) when the forward raised, which torch calls without kwargs.
        local = self._local
        depth = local.depth - 1
        if depth > 0:
            local.depth = depth
            return
        local.depth = 0  # never below: hooks installed in the middle of a forward see its end only
        record, local.top = local.top, None
        if record is None or depth < 0:
            return
        kwargs = rest[0] if len(rest) == 2 else None
        calls = record.calls
        if len(rest) != 2:
            calls.raised += 1
        inputs = _inputs(args, kwargs)
        batch = seq = None
        if inputs is not None and inputs.dim() >= 1:
            batch = int(inputs.shape[0])
            seq = int(inputs.shape[1]) if inputs.dim() >= 2 else None
            tokens = batch * (seq or 1)
            calls.tokens += tokens
            if calls.batch is None or tokens > calls.batch * (calls.seq or 1):
                calls.batch, calls.seq = batch, seq
        device = _autocast_device(inputs.device) if inputs is not None else record.device
        autocast = _autocast_dtype(device)
        if autocast is not None:
            calls.autocast_forwards += 1
            calls.autocast = autocast
        if record.replayed:
            record.replayed = False
            seen = record.probe.observed if record.probe is not None else None
            if seen is not None and seen.forwards == 1 and seen.batch is None and seq is not None:
                seen.batch, seen.seq = batch, seq  # the tokens came as keyword arguments
        if record.is_model and calls.forwards == 1:  # once: reading a 1B model takes about 25 ms
            record.setup = inspect_setup([module], self._optimizers_of(module), {}, None)
            record.config = getattr(module, "config", None)
        elif record.is_model and calls.forwards == 2 and record.setup is not None:
            read_optimizers(record.setup, self._optimizers_of(module))  # their state exists after a step
        if not calls.backward and len(rest) == 2:
            target = _grad_output(rest[1])
            if target is not None:
                # A tensor that refuses hooks leaves the flag unset rather than failing the test's forward.
                with contextlib.suppress(RuntimeError):
                    target.register_hook(record.backward_reached)

    def _stepped(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        known = self._optimizers.get(id(optimizer))
        if known is None or known() is not optimizer:
            self._optimizers.pop(id(optimizer), None)  # a dead one's id, reused: this one steps from now
            self._optimizers[id(optimizer)] = weakref.ref(optimizer)
            # Named now: a test's own optimizer is gone with its model when the test function returns.
            for record in list(self._records.values()):
                if record.setup is not None and record.setup.optimizer is None:
                    record.setup.optimizer = type(optimizer).__name__


def _parameter_ids(optimizer: Any) -> set[int]:
    return {id(p) for group in getattr(optimizer, "param_groups", ()) for p in group.get("params", ())}
