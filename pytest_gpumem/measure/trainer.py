"""Measure tests that train through ``transformers.Trainer`` (TRL's trainers included) without extra code.

:func:`install` adds :class:`GpuMemCallback` to the callbacks every Trainer is
built with; while a test is measured, the callback shows the advisor the model,
the optimizer and the Trainer's knobs, and records each optimizer step as a
phase (``step1``, ``step2``, ...). Outside a measured test it does nothing.

Importing this module does not import transformers: the callback class, a
``TrainerCallback`` subclass, is made on first use, and :func:`install` only
touches ``transformers.trainer`` where the test run has imported it already.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

from pytest_gpumem.measure.measurement import Measurement, active

_OPTIMIZERS = {
    "adamw_torch": "adamw",
    "adamw_torch_fused": "adamw",
    "adamw_hf": "adamw",
    "adamw_8bit": "adamw8bit",
    "adamw_bnb_8bit": "adamw8bit",
    "paged_adamw_8bit": "paged_adamw8bit",
}
"""Trainer's ``optim`` names of the optimizers the advisor knows (measurement.KNOBS' ``optimizer`` values)."""


class GpuMemEvents:
    """The callback's behaviour, without transformers: the hooks :class:`GpuMemCallback` runs.

    Each event looks up the running test's measurement, so one callback
    instance (a Trainer built in a fixture, say) serves whichever test runs.
    """

    def __init__(self) -> None:
        self._step: tuple[Measurement, str] | None = None  # the step phase open now

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        measurement = active()
        if measurement is None:
            return
        model = kwargs.get("model")
        if model is not None:
            measurement.register_model(model)  # also attaches the probe that watches the step
        _add_optimizer(measurement, kwargs.get("optimizer"))
        knobs = measurement.registration.knobs
        knobs.setdefault("batch", args.per_device_train_batch_size)
        knobs.setdefault("accumulation", args.gradient_accumulation_steps)
        # Newer transformers call it activation_checkpointing (gradient_checkpointing mirrors it).
        checkpointing = getattr(args, "activation_checkpointing", None)
        knobs.setdefault("gradient_checkpointing", bool(checkpointing or args.gradient_checkpointing))
        knobs.setdefault("autocast", "bfloat16" if args.bf16 else "float16" if args.fp16 else None)
        optim = _OPTIMIZERS.get(str(getattr(args.optim, "value", args.optim)))
        if optim is not None:
            knobs.setdefault("optimizer", optim)
        if getattr(args, "max_steps", 0) > 0:
            knobs.setdefault("steps", args.max_steps)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()
        measurement = active()
        if measurement is None or measurement.finished:
            return
        _add_optimizer(measurement, kwargs.get("optimizer"))
        name = f"step{state.global_step + 1}"
        measurement.enter(name)
        self._step = (measurement, name)

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        measurement = active()
        if measurement is not None:
            _add_optimizer(measurement, kwargs.get("optimizer"))

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._close_step()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # Training may stop inside a step (should_training_stop, an exception caught by a callback).
        self._close_step()

    def _close_step(self) -> None:
        if self._step is None:
            return
        measurement, name = self._step
        self._step = None
        if not measurement.finished:
            measurement.exit(name)


def _add_optimizer(measurement: Measurement, optimizer: Any) -> None:
    if optimizer is None:
        return
    # Trainer's optimizer is accelerate's AcceleratedOptimizer; the advisor wants the optimizer inside it.
    inner = getattr(optimizer, "optimizer", None)
    if hasattr(inner, "param_groups") and hasattr(inner, "state"):
        optimizer = inner
    measurement.registration.add_optimizer(optimizer)


@functools.cache
def _callback_class() -> type:
    from transformers import TrainerCallback

    return type(
        "GpuMemCallback",
        (GpuMemEvents, TrainerCallback),
        {
            "__module__": __name__,
            "__doc__": "A TrainerCallback that shows pytest-gpumem the running test's model, optimizer and knobs, "
            "and records each optimizer step as a phase (``step1``, ``step2``, ...).",
        },
    )


def __getattr__(name: str) -> Any:
    # ``from pytest_gpumem.measure.trainer import GpuMemCallback`` makes the class (and imports transformers) only then.
    if name == "GpuMemCallback":
        return _callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install() -> bool:
    """Add :class:`GpuMemCallback` to ``transformers.trainer.DEFAULT_CALLBACKS``, so every Trainer built from
    now on has it; once only. Where transformers' trainer is not imported yet, nothing (and False)."""
    trainer = sys.modules.get("transformers.trainer")
    callbacks = getattr(trainer, "DEFAULT_CALLBACKS", None)
    if not isinstance(callbacks, list):
        return False
    callback = _callback_class()
    if callback not in callbacks:
        callbacks.append(callback)  # in place: modules that imported the list by name see it too
    return True


def uninstall() -> None:
    """Remove :class:`GpuMemCallback` from ``DEFAULT_CALLBACKS`` again (Trainers built meanwhile keep it)."""
    trainer = sys.modules.get("transformers.trainer")
    callbacks = getattr(trainer, "DEFAULT_CALLBACKS", None)
    if isinstance(callbacks, list) and _callback_class.cache_info().currsize:
        callback = _callback_class()
        while callback in callbacks:
            callbacks.remove(callback)
