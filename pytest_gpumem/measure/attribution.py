"""Attribution: which consumer held the peak's bytes, and where the test was when it happened.

A :class:`~pytest_gpumem.measure.meters.tracker.StorageTracker` records every storage
a test makes; the :class:`Attributor` tells it what each one is, through
PyTorch's global hooks, so that no test has to register anything:

- a module's forward that starts outside any other (a model's top-level
  call) marks its parameters, buffers and quantization statistics as
  **weights**, and hooks its trainable parameters so that their gradients are
  marked when accumulated;
- every optimizer's step marks the gradients it reads as **gradients** and,
  after it, its state as **optimizer** state;
- everything else the test made is an **activation** (saved for backward, or a
  temporary alive at the moment).

The same hooks keep the tracker's location current: the module running (its
qualified name), whether the model's repeated blocks (decoder layers) are
running, and the stage (forward, backward, optimizer step, load). The
attributor changes no tensor and no autograd graph: hooks only read.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from pytest_gpumem.core.sample import Attribution, Breakdown, Peaks
from pytest_gpumem.measure.introspect import decoder_layers, quantization_statistics
from pytest_gpumem.measure.meters.tracker import GRADIENTS, OPTIMIZER, WEIGHTS, StorageTracker

_PEFT_PREFIX = "base_model.model."


class Attributor:
    """Installs the global hooks that classify storages and locate the peak; one per measured test."""

    def __init__(self, tracker: StorageTracker) -> None:
        self.tracker = tracker
        self.names: dict[int, str] = {}
        self._layers: set[int] = set()
        self._scanned: set[int] = set()
        self._grad_hooked: set[int] = set()
        self._handles: list[Any] = []
        self._handles += [
            register_module_forward_pre_hook(self._before_forward),
            register_module_forward_hook(self._after_forward, always_call=True),
            register_optimizer_step_pre_hook(self._before_step),
            register_optimizer_step_post_hook(self._after_step),
        ]

    def close(self) -> None:
        """Remove every hook (the global ones and those on parameters)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    # -- hooks

    def _before_forward(self, module: torch.nn.Module, args: Any) -> None:
        tracker = self.tracker
        if not tracker.module_stack and torch._C._current_autograd_node() is None:
            self.register_model(module)
        tracker.module_stack.append(id(module))
        if id(module) in self._layers:
            tracker.layer_depth += 1

    def _after_forward(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        tracker = self.tracker
        if tracker.module_stack and tracker.module_stack[-1] == id(module):
            tracker.module_stack.pop()
            if id(module) in self._layers:
                tracker.layer_depth -= 1

    def _before_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for group in optimizer.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self.tracker.classify(param.grad, GRADIENTS)
        self.tracker.stage_override = "optimizer"

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if torch.is_tensor(value):
                    self.tracker.classify(value, OPTIMIZER)
        self.tracker.stage_override = ""

    def _grad_accumulated(self, param: torch.Tensor) -> None:
        if param.grad is not None:
            self.tracker.classify(param.grad, GRADIENTS)

    # -- models

    def register_model(self, model: torch.nn.Module) -> None:
        """Mark a model's parameters, buffers and quantization statistics as weights (again: LoRA and
        kbit preparation replace parameters), and learn its module names and repeated blocks."""
        tracker = self.tracker
        if id(model) not in self._scanned:
            self._scanned.add(id(model))
            for name, module in model.named_modules():
                self.names.setdefault(id(module), name.removeprefix(_PEFT_PREFIX) or type(module).__name__)
            self._layers.update(id(m) for m in decoder_layers(model))
        # A module's own parameters and buffers, read from its dicts: what parameters(recurse=False) and
        # buffers(recurse=False) give, without building two generators per module at every forward.
        for module in model.modules():
            for param in module._parameters.values():
                if param is None:
                    continue
                tracker.classify(param, WEIGHTS)
                for tensor in quantization_statistics(param, module):
                    tracker.classify(tensor, WEIGHTS)
                if param.requires_grad and id(param) not in self._grad_hooked:
                    self._grad_hooked.add(id(param))
                    self._handles.append(param.register_post_accumulate_grad_hook(self._grad_accumulated))
            for buffer in module._buffers.values():
                if buffer is not None:
                    tracker.classify(buffer, WEIGHTS)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Label what runs inside as stage ``name`` (``load``: making a model)."""
        previous = self.tracker.stage_override
        self.tracker.stage_override = name
        try:
            yield
        finally:
            self.tracker.stage_override = previous

    # -- the result

    def result(self, call: Peaks) -> Attribution | None:
        """The attribution of the call phase's allocated peak (``call``: that phase's peaks), or None
        where the window saw nothing."""
        tracker = self.tracker
        allocated = call.get("allocated") or {}
        if not allocated or tracker.window is None:
            return None
        device = max(allocated, key=lambda d: allocated[d])
        if device not in tracker.window:
            return None
        _, seq, where = tracker.window[device]
        reserved = (call.get("reserved") or {}).get(device)
        used = (call.get("device") or {}).get(device)
        attribution = self.at(device, seq, where)
        attribution.fragmentation = max(0, reserved - allocated[device]) if reserved is not None else 0
        attribution.context = max(0, used - reserved) if used is not None and reserved is not None else 0
        return attribution

    def at(self, device: str, seq: int, where: tuple[str, str, Any]) -> Attribution:
        """The bytes alive on ``device`` at moment ``seq`` by consumer, located at ``where`` (phase, stage,
        module), with the highest moment of each stage of the window so far (the moment of an
        out-of-memory error, for one)."""
        phase, stage, module = where
        if isinstance(module, int):
            module = self.names.get(module, "")
        stages = {
            name: self._breakdown(device, peaks[device][1])
            for name, peaks in sorted(self.tracker.stage_peaks.items())
            if name and device in peaks
        }
        return Attribution(
            peak=self._breakdown(device, seq),
            device=device,
            phase=phase,
            stage=stage,
            module=module or "",
            stages=stages,
        )

    def _breakdown(self, device: str, seq: int) -> Breakdown:
        weights, gradients, optimizer, activations, in_layers = self.tracker.breakdown(device, seq)
        return Breakdown(weights, gradients, optimizer, activations, in_layers)
