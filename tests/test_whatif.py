"""What-if runs of a registered step on a real tiny QLoRA model, measured by the cpu meter."""

from __future__ import annotations

import functools
import weakref

import pytest
import torch

from pytest_gpumem.advise.whatif import accepted_knobs, make_measure, step_arguments
from pytest_gpumem.config import backend
from pytest_gpumem.measure.measurement import Registration
from pytest_gpumem.measure.meters import base
from pytest_gpumem.models import loading, training

pytest.importorskip("transformers")

KNOBS = {"batch": 4, "seq": 32, "steps": 2, "accumulation": 1, "gradient_checkpointing": False}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return loading.make_checkpoint(tmp_path_factory.mktemp("checkpoints"), "llama", "tiny")


@pytest.fixture
def model(checkpoint):
    loaded = loading.load(checkpoint, "nf4", True, "bfloat16", None)
    return loading.add_lora(loaded, r=8, gradient_checkpointing=False)


def registered(model, step=None, **knobs) -> Registration:
    registration = Registration(step=step or functools.partial(training.train_steps, model), knobs={**KNOBS, **knobs})
    registration.add_model(model)
    return registration


def cpu_meter() -> base.Meter:
    return backend.create("cpu")


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def test_no_step_no_measure():
    assert make_measure(Registration(knobs=dict(KNOBS)), cpu_meter) is None


def test_the_reference_run_repeats_to_the_byte(model):
    measure = make_measure(registered(model), cpu_meter)
    assert measure is not None
    first = measure({})
    assert first > 0
    assert measure({}) == first


@pytest.mark.parametrize(
    "overrides",
    [{"batch": 2, "accumulation": 2}, {"gradient_checkpointing": True}, {"seq": 16}],
    ids=["half-batch", "checkpointing", "half-seq"],
)
def test_a_lever_lowers_the_measured_peak(model, overrides):
    measure = make_measure(registered(model), cpu_meter)
    assert measure is not None
    assert measure(overrides) < measure({})


def test_a_run_leaves_the_model_as_it_was(model):
    layer = model.base_model.model.model.layers[0]
    model.train()
    layer.eval()  # a mixed state that model.train() inside the step would flatten
    hooks = dict(model.get_input_embeddings()._forward_hooks)
    before = trainable(model)
    rng = torch.get_rng_state()
    measure = make_measure(registered(model), cpu_meter)
    assert measure is not None

    measure({"gradient_checkpointing": True})  # turns checkpointing on, adds an embedding hook, trains

    after = trainable(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[name], before[name]) for name in before)
    assert model.training and not layer.training
    assert not model.base_model.model.is_activation_checkpointing
    assert dict(model.get_input_embeddings()._forward_hooks) == hooks
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())


def test_the_step_really_trained_the_model_it_restored(model):
    # The restore test above would pass vacuously if the step changed nothing: it does.
    before = trainable(model)
    training.train_steps(model, batch=2, seq=16, steps=2)
    after = trainable(model)
    assert any(not torch.equal(after[name], before[name]) for name in before)


def test_a_failing_run_is_restored_and_raises(model):
    before = trainable(model)

    def step(**knobs):
        training.train_steps(model, **knobs)
        raise RuntimeError("step failed after training")

    measure = make_measure(registered(model, step=step), cpu_meter)
    assert measure is not None
    with pytest.raises(RuntimeError, match="step failed after training"):
        measure({})
    after = trainable(model)
    assert all(torch.equal(after[name], before[name]) for name in before)


def test_out_of_memory_is_raised_again_without_the_runs_tensors():
    alive: list[weakref.ref] = []

    def step(batch: int) -> None:
        held = torch.ones(batch, 1024)
        alive.append(weakref.ref(held))
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    measure = make_measure(Registration(step=step, knobs={"batch": 4}), cpu_meter)
    assert measure is not None
    with pytest.raises(torch.cuda.OutOfMemoryError, match=r"Tried to allocate 2\.00 GiB") as raised:
        measure({})
    assert raised.value.__context__ is None
    assert "step" not in {entry.name for entry in raised.traceback}  # the failed run's frames are gone
    assert alive[0]() is None


def test_the_peak_is_the_runs_own_allocation():
    def step(batch: int, seq: int) -> None:
        torch.ones(batch, seq, dtype=torch.float32)

    measure = make_measure(Registration(step=step, knobs={"batch": 4, "seq": 256}), cpu_meter)
    assert measure is not None
    assert measure({}) == 4 * 256 * 4
    assert measure({"batch": 2}) == 2 * 256 * 4


@pytest.mark.parametrize(
    ("step", "accepted"),
    [
        (lambda batch, seq: None, {"batch", "seq"}),
        (lambda batch, *, seq=1, **rest: None, None),
        (functools.partial(lambda model, batch, optimizer="adamw": None, "model"), {"batch", "optimizer"}),
    ],
)
def test_accepted_knobs_come_from_the_signature(step, accepted):
    knobs = accepted_knobs(step)
    assert (knobs if knobs is None else knobs - {"model"}) == accepted


def test_only_accepted_knobs_are_passed_and_a_refused_override_raises():
    accepted = frozenset({"batch", "seq"})
    knobs = {"batch": 4, "seq": 64, "optimizer": "adamw"}
    assert step_arguments(knobs, {"batch": 2}, accepted) == {"batch": 2, "seq": 64}
    assert step_arguments(knobs, {"autocast": "bfloat16"}, None) == {**knobs, "autocast": "bfloat16"}
    with pytest.raises(ValueError, match="the registered step does not take the knob 'autocast'"):
        step_arguments(knobs, {"autocast": "bfloat16"}, accepted)
