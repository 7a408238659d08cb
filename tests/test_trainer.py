"""The Trainer callback: a real transformers.Trainer run inside a real measurement."""

from __future__ import annotations

import inspect
import json
import sys
import warnings

import pytest
import torch

from pytest_gpumem.config import backend
from pytest_gpumem.measure import trainer
from pytest_gpumem.measure.introspect import Probe, inspect_setup
from pytest_gpumem.measure.measurement import Measurement, active
from pytest_gpumem.models import loading

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
hf_trainer = pytest.importorskip("transformers.trainer")  # install() acts only where it is imported already


@pytest.fixture
def installed():
    before = list(hf_trainer.DEFAULT_CALLBACKS)
    assert trainer.install()
    yield
    trainer.uninstall()
    assert hf_trainer.DEFAULT_CALLBACKS == before


class TokenDataset(torch.utils.data.Dataset):
    """Random token rows with their labels: what a tokenized causal-LM dataset gives the Trainer."""

    def __init__(self, rows: int, seq: int, vocab: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(0, vocab, (rows, seq), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.tokens[i], "labels": self.tokens[i]}


def make_trainer(tmp_path, model, **overrides):
    options = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        bf16=True,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    options.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        args = transformers.TrainingArguments(**options)
    return transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(16, 16, model.config.vocab_size))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return loading.make_checkpoint(tmp_path_factory.mktemp("checkpoints"), "llama", "tiny")


def lora_model(checkpoint):
    model = loading.load(checkpoint, "bf16", True, "bfloat16", device_map=None)
    return loading.add_lora(model, r=4, gradient_checkpointing=False)


def test_a_trainer_run_registers_the_model_optimizer_knobs_and_one_phase_per_step(tmp_path, checkpoint, installed):
    model = lora_model(checkpoint)
    probe = Probe(model)
    measurement = Measurement(backend.create("cpu"))
    try:
        measurement.registration.knobs["batch"] = 7  # a test's own registration wins over the Trainer's
        measurement.enter("call")
        run = make_trainer(tmp_path, model)
        assert any(type(cb).__name__ == "GpuMemCallback" for cb in run.callback_handler.callbacks)
        run.train()
        measurement.exit("call")
    finally:
        sample = measurement.finish()
        probe.detach()
    registration = measurement.registration
    assert registration.models == [model]
    assert len(registration.optimizers) == 1
    optimizer = registration.optimizers[0]
    assert isinstance(optimizer, torch.optim.AdamW)  # unwrapped from accelerate's AcceleratedOptimizer
    assert optimizer.state  # the very optimizer that stepped
    assert registration.knobs == {
        "batch": 7,
        "accumulation": 2,
        "gradient_checkpointing": False,
        "autocast": "bfloat16",
        "optimizer": "adamw",
        "steps": 2,
    }
    assert list(sample.phases) == ["call", "step1", "step2"]
    for name in ("step1", "step2"):
        assert sample.value("allocated", name) > 0
    assert sample.value("allocated", "call") >= sample.value("allocated", "step1")
    # What the advisor gets: the step ran under the Trainer's bf16 autocast; AdamW keeps two moments.
    setup = inspect_setup(registration.models, registration.optimizers, registration.knobs, probe)
    assert (setup.autocast, setup.optimizer, setup.batch, setup.seq, setup.training) == (
        "bfloat16",
        "AdamW",
        7,
        16,
        True,
    )
    steps = sum(state["step"].nbytes for state in optimizer.state.values())
    assert setup.optimizer_state_bytes == 2 * setup.trainable_bytes + steps


def test_a_step_left_open_by_stopping_early_is_closed_at_train_end(tmp_path, checkpoint, installed):
    class StopInsideTheStep(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            raise KeyboardInterrupt  # stands for anything that ends a step before on_step_end

    model = lora_model(checkpoint)
    measurement = Measurement(backend.create("cpu"))
    try:
        measurement.enter("call")
        run = make_trainer(tmp_path, model, bf16=False)
        run.add_callback(StopInsideTheStep)
        callback = next(cb for cb in run.callback_handler.callbacks if type(cb).__name__ == "GpuMemCallback")
        with pytest.raises(KeyboardInterrupt):
            run.train()
        callback.on_train_end(run.args, run.state, run.control)
        with pytest.raises(ValueError):  # step1 was closed
            measurement.exit("step1")
        measurement.exit("call")
    finally:
        measurement.finish()
    assert measurement.registration.knobs["autocast"] is None


def test_outside_a_measured_test_the_callback_does_nothing(tmp_path, checkpoint, installed):
    assert active() is None
    model = lora_model(checkpoint)
    run = make_trainer(tmp_path, model, max_steps=1, bf16=False)
    run.train()  # no measurement to register with, no phase to open: no error either
    assert run.state.global_step == 1


def test_install_is_idempotent_and_uninstall_restores_the_defaults():
    before = list(hf_trainer.DEFAULT_CALLBACKS)
    assert trainer.install() and trainer.install()
    added = [cb for cb in hf_trainer.DEFAULT_CALLBACKS if cb not in before]
    assert added == [trainer.GpuMemCallback]
    assert issubclass(trainer.GpuMemCallback, transformers.TrainerCallback)
    trainer.uninstall()
    trainer.uninstall()
    assert hf_trainer.DEFAULT_CALLBACKS == before


def test_install_never_imports_transformers(monkeypatch):
    monkeypatch.delitem(sys.modules, "transformers.trainer")
    assert trainer.install() is False
    trainer.uninstall()
    assert "transformers.trainer" not in sys.modules


def test_the_plugin_installs_the_callback_for_every_measured_test(pytester, checkpoint):
    """No extra code: a test that trains through a Trainer gets step phases and its setup explained."""
    pytester.makepyfile(
        test_hf=f"""
        import pytest, transformers, warnings
        from pytest_gpumem.models import loading
        from tests_trainer_support import make_trainer

        @pytest.mark.gpumem
        def test_train(tmp_path, gpumem):
            model = loading.add_lora(loading.load({str(checkpoint)!r}, "bf16", True, "bfloat16", None), r=4,
                                    gradient_checkpointing=False)
            make_trainer(tmp_path, model).train()
        """,
        tests_trainer_support="import torch, transformers, warnings\n\n"
        + inspect.getsource(TokenDataset)
        + "\n\n"
        + inspect.getsource(make_trainer),
    )
    result = pytester.runpytest("--gpumem-json=out.json", "--gpumem-explain=all")
    result.assert_outcomes(passed=1)
    test = json.loads((pytester.path / "out.json").read_text())["tests"][0]
    assert {"step1", "step2"} <= set(test["sample"]["phases"])
    levers = {lever["key"]: lever for lever in test["advice"]["levers"]}
    assert "per-device batch 2 -> 1" in levers["batch"]["action"]
    assert hf_trainer.DEFAULT_CALLBACKS == [c for c in hf_trainer.DEFAULT_CALLBACKS if c.__name__ != "GpuMemCallback"]
