"""Discovery of the models and optimizers a test runs, from real loops over real (tiny) models."""

from __future__ import annotations

import gc
import json
import threading
import warnings
import weakref
from typing import Any

import pytest
import torch
import torch.nn.modules.module as module_hooks
import torch.optim.optimizer as optimizer_hooks
from torch import nn

from pytest_gpumem.measure.discovery import Discovery, ForwardCalls
from pytest_gpumem.measure.introspect import Probe

BATCH, SEQ, VOCAB = 2, 12, 128


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def inputs(batch: int = 8) -> torch.Tensor:
    return torch.randn(batch, 16, generator=torch.Generator().manual_seed(0))


def tiny_llama(**config: object) -> Any:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    settings = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "use_cache": False,
        **config,
    }
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**settings))


def tokens(batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(0))


def global_hooks() -> dict[str, dict[int, object]]:
    """Copies of torch's global hook registries that discovery writes to."""
    return {
        "forward_pre": dict(module_hooks._global_forward_pre_hooks),
        "forward": dict(module_hooks._global_forward_hooks),
        "always_called": dict(module_hooks._global_forward_hooks_always_called),
        "with_kwargs": dict(module_hooks._global_forward_hooks_with_kwargs),
        "optimizer_pre": dict(optimizer_hooks._global_optimizer_pre_hooks),
    }


def test_plain_loop_finds_the_model_and_its_optimizer() -> None:
    model = mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss_fn = nn.MSELoss()  # a top-level call too, but without parameters: not a model
    with Discovery() as found:
        for _ in range(3):
            loss = loss_fn(model(inputs()), torch.zeros(8, 4))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    assert len(found.models) == 1 and found.models[0] is model
    assert len(found.optimizers) == 1 and found.optimizers[0] is optimizer
    calls = found.calls(model)
    assert calls == ForwardCalls(
        model_class="Sequential",
        kind="module",
        forwards=3,
        grad_forwards=3,
        batch=8,
        seq=16,
        tokens=3 * 8 * 16,
        train_mode=True,
        backward=True,
    )
    assert found.calls(model[0]) is None  # a submodule is never top-level
    loss_calls = found.calls(loss_fn)
    assert loss_calls is not None and loss_calls.forwards == 3 and found.probe(loss_fn) is None
    assert found.summary() == [{**calls.__dict__, "optimizers": ["AdamW"]}]
    assert json.loads(json.dumps(found.summary())) == found.summary()


def test_peft_model_is_the_top_level_model_and_its_probe_sees_the_first_forward() -> None:
    peft = pytest.importorskip("peft")
    base = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # transformers' renames, called by peft
        model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.train()
    ids = tokens()
    with Discovery() as found:
        model(input_ids=ids, labels=ids).loss.backward()
        probe = found.probe(model)
        assert isinstance(probe, Probe)
        # torch skips a pre-hook added during the global one; discovery replays it for this first forward
        assert (probe.observed.forwards, probe.observed.batch, probe.observed.seq) == (1, BATCH, SEQ)
        assert probe.observed.backward and probe.observed.training
        assert probe.observed.hidden_dtype == "float32" and probe.observed.logits_dtype == "float32"
        model(input_ids=tokens(BATCH, 20), labels=tokens(BATCH, 20))  # no backward for this one
        assert probe.observed.forwards == 2
        assert len(model._forward_pre_hooks) == 1  # the probe's, registered once
    assert found.models == [model]
    assert found.calls(base) is None
    calls = found.calls(model)
    assert calls is not None
    assert (calls.kind, calls.model_class) == ("peft", "PeftModel")
    assert (calls.forwards, calls.grad_forwards, calls.batch, calls.seq) == (2, 2, BATCH, 20)
    assert calls.tokens == BATCH * SEQ + BATCH * 20
    assert calls.train_mode and not calls.eval_mode and calls.backward
    assert (probe.observed.batch, probe.observed.seq) == (BATCH, 20)
    assert model._forward_pre_hooks == {} and model._forward_hooks == {}


def test_a_transformers_model_is_of_kind_transformers_and_recomputation_is_not_a_forward() -> None:
    model = tiny_llama()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the method's new name is transformers 5's only
        model.gradient_checkpointing_enable()
    model.train()
    ids = tokens()
    with Discovery() as found:
        model(input_ids=ids, labels=ids).loss.backward()
    assert found.models == [model]  # the decoder layers' submodules rerun in backward, at depth 0
    calls = found.calls(model)
    assert calls is not None and (calls.kind, calls.forwards, calls.backward) == ("transformers", 1, True)
    probe = found.probe(model)
    assert probe is not None and probe.observed.recomputed


def test_a_compiled_model_is_found_as_the_wrapper_the_test_calls() -> None:
    model = mlp()
    compiled = torch.compile(model, backend="eager")
    with Discovery() as found, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*global hooks on modules")
        for _ in range(2):
            compiled(inputs()).sum().backward()
    assert found.models == [compiled] and found.calls(model) is None
    calls = found.calls(compiled)
    assert calls is not None
    assert (calls.model_class, calls.kind, calls.forwards, calls.batch, calls.backward) == (
        "Sequential",
        "module",
        2,
        8,
        True,
    )


def test_grad_no_grad_and_inference_forwards_are_counted_apart() -> None:
    model = mlp()
    with Discovery() as found:
        model(inputs(4))  # grad enabled, no backward
        calls = found.calls(model)
        assert calls is not None and (calls.grad_forwards, calls.backward) == (1, False)
        with torch.no_grad():
            model(inputs(6))
            model(inputs(6))
        with torch.inference_mode():
            model(inputs(2))
    assert (calls.forwards, calls.grad_forwards, calls.no_grad_forwards, calls.inference_forwards) == (4, 1, 2, 1)
    assert (calls.batch, calls.seq, calls.tokens) == (6, 16, (4 + 6 + 6 + 2) * 16)
    assert not calls.backward


def test_modes_and_autocast() -> None:
    model = mlp()
    with Discovery() as found:
        model.eval()
        model(inputs())
        calls = found.calls(model)
        assert calls is not None and (calls.train_mode, calls.eval_mode) == (False, True)
        model.train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(inputs())
        assert out.dtype == torch.bfloat16
        model(inputs())  # autocast off again: counted out, the dtype seen stays
    assert (calls.train_mode, calls.eval_mode) == (True, True)
    assert (calls.forwards, calls.autocast_forwards, calls.autocast) == (3, 1, "bfloat16")


class Keywords(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, scale: float = 1.0, x: torch.Tensor | None = None) -> torch.Tensor:
        assert x is not None
        return x * self.weight * scale


def test_one_dimensional_inputs_have_a_batch_and_no_sequence() -> None:
    model = Keywords()
    with Discovery() as found:
        model(2.0, torch.randn(9))
        calls = found.calls(model)
        assert calls is not None and (calls.batch, calls.seq, calls.tokens) == (9, None, 9)
        model(x=torch.randn(7, 5))  # keyword arguments only: the first tensor among them
    assert (calls.batch, calls.seq, calls.tokens) == (7, 5, 9 + 7 * 5)


def test_teacher_and_student_are_both_found_the_trained_one_first() -> None:
    teacher, student = mlp(), mlp()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.1)
    with Discovery() as found:
        for _ in range(2):
            x = inputs()
            with torch.no_grad():
                target = teacher(x)
            loss = nn.functional.mse_loss(student(x), target)
            loss.backward()
            optimizer.step()
    assert found.models == [student, teacher]  # as many tokens: the one a backward reached first
    t, s = found.calls(teacher), found.calls(student)
    assert t is not None and (t.forwards, t.no_grad_forwards, t.grad_forwards, t.backward) == (2, 2, 0, False)
    assert s is not None and (s.forwards, s.grad_forwards, s.backward) == (2, 2, True)
    assert [entry["optimizers"] for entry in found.summary()] == [["SGD"], []]


def test_more_tokens_come_first() -> None:
    small, large = mlp(), mlp()
    with Discovery() as found:
        small(inputs(2)).sum().backward()
        large(inputs(8))
    assert found.models == [large, small]


class Outer(nn.Module):
    """Calls a module it does not own inside its forward, as a distillation wrapper or a loss might."""

    def __init__(self, other: nn.Module) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)
        self.other = [other]  # a plain list: not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other[0](self.linear(x))


def test_a_model_called_inside_another_forward_is_not_top_level() -> None:
    inner = mlp()
    outer = Outer(inner)
    with Discovery() as found:
        outer(inputs())
        assert found.models == [outer] and found.calls(inner) is None
        inner(inputs())  # on its own, it is top-level
    assert found.models == [outer, inner]  # as many tokens: the first seen first


def test_top_level_is_per_thread() -> None:
    outer_model, other = mlp(), mlp()
    started, release = threading.Event(), threading.Event()

    class Blocking(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            started.set()
            release.wait(timeout=10)
            return outer_model(x)

    blocking = Blocking()
    with Discovery() as found:
        worker = threading.Thread(target=blocking, args=(inputs(),))
        worker.start()
        assert started.wait(timeout=10)
        other(inputs())  # while the worker's forward runs: top-level here
        release.set()
        worker.join(timeout=10)
    assert found.calls(other) is not None
    assert found.calls(blocking) is not None and found.calls(outer_model) is None


def test_stop_removes_every_hook_and_keeps_what_was_found() -> None:
    before = global_hooks()
    had_hooks = module_hooks._has_any_global_hook()
    model = mlp()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    found = Discovery()
    found.stop()  # before start: nothing to remove
    found.start()
    found.start()  # already running: nothing more installed
    during = global_hooks()
    assert {name: len(during[name]) - len(before[name]) for name in during} == {
        "forward_pre": 1,
        "forward": 1,
        "always_called": 1,
        "with_kwargs": 1,
        "optimizer_pre": 1,
    }
    model(inputs()).sum().backward()
    optimizer.step()
    assert len(model._forward_pre_hooks) == 1 and len(model._forward_hooks) == 1  # the probe's
    found.stop()
    found.stop()
    assert global_hooks() == before
    assert module_hooks._has_any_global_hook() == had_hooks
    assert model._forward_pre_hooks == {} and model._forward_hooks == {}
    model(inputs())  # not seen any more
    calls = found.calls(model)
    assert calls is not None and calls.forwards == 1 and calls.backward
    assert found.optimizers == [optimizer]


def test_a_freed_model_is_not_kept_alive() -> None:
    model, kept = mlp(), mlp()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with Discovery() as found:
        model(inputs()).sum().backward()
        optimizer.step()
        kept(inputs())
        assert found.models == [model, kept]
        model_ref, optimizer_ref = weakref.ref(model), weakref.ref(optimizer)
        del model, optimizer
        gc.collect()
        assert model_ref() is None and optimizer_ref() is None
        assert found.models == [kept] and found.optimizers == []
        kept(inputs())
    assert found.models == [kept] and [entry["model_class"] for entry in found.summary()] == ["Sequential"]


class Failing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.linear(x)
        raise RuntimeError("out of memory, say")


def test_a_forward_that_raises_leaves_the_state_clean() -> None:
    failing, model = Failing(), mlp()
    with Discovery() as found:
        with pytest.raises(RuntimeError, match="out of memory"):
            failing(inputs(4))
        model(inputs())
    assert found.models == [model, failing]
    broken = found.calls(failing)
    assert broken is not None and (broken.forwards, broken.raised, broken.batch) == (1, 1, 4)
    calls = found.calls(model)
    assert calls is not None and (calls.forwards, calls.raised) == (1, 0)
