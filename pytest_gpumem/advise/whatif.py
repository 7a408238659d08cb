"""What-if runs: a test's registered training step run again with one knob changed, and measured.

The advisor's estimates come from one attribution; a what-if run replaces an
estimate by a measurement: the step runs again with, say, half the batch and
twice the accumulation, and its peak is compared with a reference run of the
unchanged step. Both runs start from the same state: what a run changes
(trainable parameters, train/eval modes, gradient checkpointing and the hooks
that enabling it adds, the optimizers' state, the random generators) is saved
before it and put back after it, even when it fails, so that the test's model
leaves the advisor as it came in, and every run of the same knobs gives the
same peak.
"""

from __future__ import annotations

import copy
import gc
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from pytest_gpumem.core.sample import largest
from pytest_gpumem.measure.measurement import Registration
from pytest_gpumem.measure.meters.base import Meter
from pytest_gpumem.models.loading import gradient_checkpointing_enabled, set_gradient_checkpointing


def accepted_knobs(step: Callable[..., Any]) -> frozenset[str] | None:
    """The keyword arguments ``step`` accepts, or None where it takes ``**kwargs`` (it accepts all)."""
    try:
        parameters = inspect.signature(step).parameters.values()
    except (TypeError, ValueError):  # a builtin or C callable without a signature: pass everything
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(
        p.name
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


class MissingKnob(ValueError):
    """A what-if run changes a knob that the registered step does not take as a keyword argument."""

    def __init__(self, knob: str) -> None:
        super().__init__(f"the registered step does not take the knob {knob!r}")
        self.knob = knob


class Measure(Protocol):
    """Runs the registered step with the test's knobs updated by ``overrides`` and returns its peak.
    ``gradients_alive``: the run is one micro-batch of an accumulated step, which starts with the gradients
    of the micro-batches before it alive."""

    def __call__(self, overrides: dict[str, Any], *, gradients_alive: bool = False) -> int: ...


def step_arguments(knobs: dict[str, Any], overrides: dict[str, Any], accepted: frozenset[str] | None) -> dict[str, Any]:
    """The keyword arguments of a what-if run: the test's knobs updated by ``overrides``.

    A knob the test ran with that the step does not accept is left out (the
    step has its own way of setting it); an override it does not accept raises
    MissingKnob, since the run would otherwise measure the unchanged step and
    report a saving of zero.
    """
    if accepted is not None:
        refused = sorted(set(overrides) - accepted)
        if refused:
            raise MissingKnob(refused[0])
    merged = {**knobs, **overrides}
    return merged if accepted is None else {k: v for k, v in merged.items() if k in accepted}


def _input_embeddings(model: Any) -> Any:
    try:
        return model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None


@dataclass
class ModelState:
    """What a training step changes on one model, saved so that it can be put back exactly."""

    model: Any
    params: list[tuple[Any, Any]] = field(default_factory=list)  # (parameter, its value cloned to the CPU)
    modes: list[tuple[Any, bool]] = field(default_factory=list)  # (module, its .training)
    checkpointing: bool | None = None
    embedding_hooks: frozenset[int] = frozenset()  # ids of the input embeddings' forward hooks

    @classmethod
    def save(cls, model: Any) -> ModelState:
        import torch

        with torch.no_grad():
            params = [(p, p.detach().to("cpu", copy=True)) for p in model.parameters() if p.requires_grad]
        embeddings = _input_embeddings(model)
        return cls(
            model=model,
            params=params,
            modes=[(m, m.training) for m in model.modules()],
            checkpointing=gradient_checkpointing_enabled(model),
            # Enabling checkpointing also makes the embeddings' output require grad, through a
            # forward hook that disabling it leaves in place: the hook would change later runs.
            embedding_hooks=frozenset(getattr(embeddings, "_forward_hooks", {})),
        )

    def drop_grads(self) -> None:
        """Free the gradients left from the test, so that the run starts as a fresh step does."""
        for param, _ in self.params:
            param.grad = None

    def fill_grads(self) -> None:
        """Give every trainable parameter a zero gradient: what a later micro-batch of an accumulated step
        starts with (backward then adds to them in place)."""
        import torch

        for param, _ in self.params:
            param.grad = torch.zeros_like(param)

    def restore(self) -> None:
        import torch

        if self.checkpointing is not None and gradient_checkpointing_enabled(self.model) != self.checkpointing:
            set_gradient_checkpointing(self.model, self.checkpointing)
        embeddings = _input_embeddings(self.model)
        hooks = getattr(embeddings, "_forward_hooks", None)
        if hooks is not None:
            for key in set(hooks) - self.embedding_hooks:
                del hooks[key]
        for module, training in self.modes:
            module.training = training
        with torch.no_grad():
            for param, value in self.params:
                param.copy_(value)
                param.grad = None


def _save_optimizer(optimizer: Any) -> dict[str, Any]:
    """A copy of ``optimizer``'s state dict with its tensors on the CPU (``load_state_dict`` moves them back)."""
    import torch

    def to_cpu(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.detach().to("cpu", copy=True)
        if isinstance(value, dict):
            return {k: to_cpu(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(to_cpu(v) for v in value)
        return copy.copy(value)

    return to_cpu(optimizer.state_dict())  # type: ignore[no-any-return]


def make_measure(registration: Registration, create_meter: Callable[[], Meter]) -> Measure | None:
    """A function that runs the registered step with the test's knobs updated by ``overrides`` and returns
    its peak allocated bytes (the largest over devices, above what was resident when it began); None where
    the test registered no step. With ``gradients_alive``, every trainable parameter gets a zero gradient
    once the run's measurement has begun, as a later micro-batch of an accumulated step has them: so a step
    that takes ``batch`` but not ``accumulation`` still tells the peak of a smaller micro-batch.

    Call it only after the test's own measurement has finished: each run
    measures with a fresh meter from ``create_meter``, which resets the
    device's peak statistics. A run that fails raises (the advisor then falls
    back to its estimate); a CUDA out-of-memory error is raised again as a new
    one, after its traceback (which holds the failed run's tensors) is dropped
    and the allocator's cache emptied, so that the next run starts clean.
    """
    step = registration.step
    if step is None:
        return None
    accepted = accepted_knobs(step)

    def measure(overrides: dict[str, Any], *, gradients_alive: bool = False) -> int:
        import torch

        arguments = step_arguments(registration.knobs, overrides, accepted)
        states = [ModelState.save(model) for model in registration.models]
        optimizers = [(opt, _save_optimizer(opt)) for opt in registration.optimizers]
        out_of_memory: str | None = None
        peak = 0
        try:
            for state in states:
                state.drop_grads()
            for opt, _ in optimizers:
                opt.zero_grad(set_to_none=True)
            # CUDA's generators too, where CUDA is in use (asking for their state would start it).
            cuda = range(torch.cuda.device_count()) if torch.cuda.is_initialized() else range(0)
            with torch.random.fork_rng(devices=cuda):
                meter = create_meter()
                meter.begin()
                try:
                    if gradients_alive:
                        for state in states:
                            state.fill_grads()
                    step(**arguments)
                    peak = largest(meter.mark(), "allocated") or 0
                except torch.cuda.OutOfMemoryError as error:
                    out_of_memory = str(error)
                finally:
                    meter.end()
        finally:
            for state in states:
                state.restore()
            for opt, saved in optimizers:
                opt.load_state_dict(saved)
                opt.zero_grad(set_to_none=True)
        if out_of_memory is not None:
            # Out of the except block the traceback, and the run's tensors it held, are gone.
            gc.collect()
            torch.cuda.empty_cache()
            raise torch.cuda.OutOfMemoryError(out_of_memory)
        return peak

    return measure
