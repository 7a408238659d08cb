"""The estimate backend and ``gpumem estimate``: predictions on fake tensors, checked against real CPU runs."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
pytest.importorskip("bitsandbytes")

import torch

from pytest_gpumem import cli
from pytest_gpumem.config import backend
from pytest_gpumem.core import gpus
from pytest_gpumem.core.units import BadValue
from pytest_gpumem.estimate import engine
from pytest_gpumem.estimate.meter import EstimateTracker, FakeCuda, attention_kernel
from pytest_gpumem.measure import introspect
from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.measure.meters.tracker import WEIGHTS, block_size
from pytest_gpumem.models import loading, presets, training

H100 = gpus.GPUS["H100"]
TINY = engine.Recipe(size="tiny", batch=2, seq=64)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return loading.make_checkpoint(tmp_path_factory.mktemp("models"), "llama", "tiny")


def _weights(meter: Any, build: Any) -> collections.Counter[int]:
    """The block sizes of the storages a model's building leaves as weights."""
    measurement = Measurement(meter)
    measurement.enter("call")
    measurement.register_model(build())
    records = meter.tracker.records
    found = collections.Counter(block_size(r[0]) for r in records if r[4] == WEIGHTS and r[3] == float("inf"))
    measurement.exit("call")
    measurement.finish()
    return found


def test_fake_model_has_the_real_models_weights(tiny_checkpoint: Path) -> None:
    real = _weights(
        backend.create("cpu"),
        lambda: loading.add_lora(loading.load(tiny_checkpoint, "nf4", True, "bfloat16", None), r=16),
    )
    with engine._quiet():
        fake = _weights(backend.create("estimate"), lambda: engine._build(TINY))
    assert fake == real and sum(fake.values()) > 0


def test_an_8bit_step_runs_on_fake_tensors() -> None:
    """LLM.int8()'s outlier split depends on values; the fake run counts no outliers instead of failing."""
    result = engine.estimate(dataclasses.replace(TINY, quant="int8"), H100, advise=False)
    assert result.method == "fake", result.reason
    assert result.attribution is not None and result.attribution.peak.optimizer > 0


def _cpu_step(path: Path) -> Any:
    measurement = Measurement(backend.create("cpu"))
    measurement.enter("setup")
    model = loading.add_lora(loading.load(path, "nf4", True, "bfloat16", None), r=16, gradient_checkpointing=False)
    measurement.register_model(model)
    measurement.exit("setup")

    phase = engine.warm_up_then_measure(measurement)
    training.train_steps(model, batch=TINY.batch, seq=TINY.seq, steps=2, phase=phase)
    return measurement.finish().attribution


def test_estimate_agrees_with_the_cpu_backends_measurement(tiny_checkpoint: Path) -> None:
    """Gradients and optimizer state agree exactly (every tensor is a whole number of 512-byte blocks at
    this size); activations within 15%, since the CPU runs other kernels (flash attention, bitsandbytes'
    CPU matmul) than the estimate's CUDA choices."""
    real = _cpu_step(tiny_checkpoint)
    fake = engine.run_step(dataclasses.replace(TINY, loop="trainer"), H100).attribution
    assert real is not None and fake is not None
    assert fake.stage == real.stage == "backward"
    for stage in ("optimizer", "backward"):
        assert fake.stages[stage].gradients == real.stages[stage].gradients
        assert fake.stages[stage].optimizer == real.stages[stage].optimizer
    assert fake.stages["optimizer"].gradients > 0 and fake.peak.optimizer > 0
    assert fake.peak.activations == pytest.approx(real.peak.activations, rel=0.15)


def test_estimate_of_a_step_counts_every_consumer() -> None:
    result = engine.estimate(TINY, H100, advise=False)
    assert result.method == "fake" and result.attribution is not None
    breakdown = result.attribution.peak
    assert result.peak == breakdown.total + H100.workspace
    assert result.resident < result.peak < result.reserved < result.device
    assert result.device == result.reserved + H100.context
    assert result.fits


@pytest.mark.parametrize(
    "dtype, kv_heads, mask, capability, expected",
    [
        (torch.float32, 2, None, (9, 0), "math"),  # float32 queries with grouped heads: math (probabilities kept)
        (torch.float32, 8, None, (9, 0), "efficient"),
        (torch.bfloat16, 2, None, (9, 0), "cudnn"),  # measured: torch 2.11 on an H200
        (torch.bfloat16, 2, None, (8, 0), "flash"),
        (torch.bfloat16, 8, torch.ones(1), (8, 0), "efficient"),
        (torch.bfloat16, 2, torch.ones(1), (8, 0), "math"),
    ],
)
def test_attention_kernel_is_cudas_choice(
    dtype: torch.dtype, kv_heads: int, mask: Any, capability: tuple[int, int], expected: str
) -> None:
    query = torch.empty(1, 8, 16, 64, dtype=dtype, device="meta")
    key = torch.empty(1, kv_heads, 16, 64, dtype=dtype, device="meta")
    gpu = gpus.Gpu("test", 2**34, capability)
    assert attention_kernel(query, key, key, mask, True, gpu) == expected


def test_math_attention_keeps_the_probabilities_and_counts_its_scratch() -> None:
    """As measured on an H200: float32 SDPA with grouped heads keeps q-sized copies and the float32
    probabilities, and the softmax holds a bool mask of the scores' size while it runs."""
    tracker = EstimateTracker(H100)
    with FakeCuda(H100), tracker:
        q = torch.empty(1, 4, 128, 64, device="meta", requires_grad=True)
        k = torch.empty(1, 2, 128, 64, device="meta", requires_grad=True)
        before = tracker.current["cuda:0"]
        tracker.restart_peak()
        out = torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=True, enable_gqa=True)
        kept = tracker.current["cuda:0"] - before
        peak = tracker.restart_peak()["cuda:0"] - before
    probabilities = 4 * 128 * 128 * 4
    assert kept >= probabilities + out.numel() * 4
    assert peak >= kept + 4 * 128 * 128  # the mask


@pytest.mark.parametrize(
    "text, name, memory",
    [("H100", "H100", 80 * 2**30), ("a100-80gb", "A100-80GB", 80 * 2**30), ("RTX 4090", "RTX-4090", 24 * 2**30)],
)
def test_known_gpus(text: str, name: str, memory: int) -> None:
    gpu = gpus.find_gpu(text, "--gpu")
    assert (gpu.name, gpu.memory) == (name, memory)


@pytest.mark.parametrize(
    "device, memory, name",
    [
        ("NVIDIA H200", 150_109_880_320, "H200"),
        ("NVIDIA H100 80GB HBM3", 85_045_870_592, "H100"),
        ("NVIDIA A100-SXM4-40GB", 42_298_834_944, "A100-40GB"),
        ("NVIDIA GeForce RTX 4090", 25_393_692_672, "RTX-4090"),
        ("NVIDIA B200", 191_468_634_112, "178.319GiB"),  # not in the catalogue: a GPU of its memory
    ],
)
def test_a_cuda_device_is_the_catalogues_gpu_by_its_name_and_memory(device: str, memory: int, name: str) -> None:
    assert gpus.device_gpu(device, memory).name == name


def test_a_size_is_a_gpu() -> None:
    assert gpus.find_gpu("16GiB", "--gpu").memory == 16 * 2**30


@pytest.mark.parametrize(
    "text, message",
    [("V100", "--gpu: unknown GPU 'V100'; give one of H100"), ("512MiB", "less than 1 GiB")],
)
def test_bad_gpus(text: str, message: str) -> None:
    with pytest.raises(BadValue, match=message):
        gpus.find_gpu(text, "--gpu")


def test_meta_caches_do_not_leak_into_real_quantization() -> None:
    import bitsandbytes.functional as bnb_functional

    engine.fake_model(engine.model_config(TINY), "nf4")
    state = bnb_functional.quantize_4bit(torch.randn(64, 64, dtype=torch.bfloat16), compress_statistics=True)[1]
    assert state.state2.code.device.type == "cpu"


# -- the command


def test_cli_table(capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["estimate", "--arch", "llama", "--size", "tiny", "--batch", "2", "--seq", "64", "--gpu", "H100"])
    out = capsys.readouterr().out
    assert status == 0
    assert "peak allocated" in out and "activations" in out and "fits:" in out
    assert "levers" in out and "estimated-run" in out


def test_cli_json_and_exit_status_when_it_does_not_fit(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["estimate", "--size", "tiny", "--seq", "64", "--gpu", "1GiB", "--json"]
    status = cli.main(args)
    data = json.loads(capsys.readouterr().out)
    assert status == 1
    assert data["fits"] is False and data["needed_bytes"] > 0
    assert {"peak_bytes", "reserved_bytes", "device_bytes", "attribution", "levers"} <= set(data)
    assert data["peak_bytes"] < data["reserved_bytes"] < data["device_bytes"]
    assert set(data["attribution"]["peak"]) >= {"weights", "gradients", "optimizer", "activations"}


def test_cli_takes_a_config_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from transformers import AutoConfig

    AutoConfig.for_model("qwen2", **presets.preset("qwen2", "tiny").config).save_pretrained(tmp_path)
    assert cli.main(["estimate", "--arch", str(tmp_path / "config.json"), "--seq", "64", "--no-levers", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["method"] == "fake"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu", "V100"], "gpumem estimate: error: --gpu: unknown GPU 'V100'"),
        (["--batch", "0"], "gpumem estimate: error: --batch: must be a positive integer, got 0"),
        (["--arch", "gpt9"], "gpumem estimate: error: --arch: 'gpt9' is neither a preset"),
        (["--size", "99b"], "gpumem estimate: error: --arch/--size: unknown size '99b' for llama"),
        (["--quant", "nf3"], "gpumem estimate: error: --quant: unknown quantization 'nf3'"),
    ],
)
def test_cli_bad_input(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["estimate", "--size", "tiny", "--seq", "64", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


# -- the backend through pytest

SUITE = """
def test_qlora(quantized_model, lora, train_step):
    model = lora(quantized_model("llama", size="tiny", quant="nf4"), r=8, gradient_checkpointing=False)
    train_step(model, batch=2, seq=64, steps=2)
"""


def test_backend_keeps_its_own_baselines(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_estimated=SUITE)  # a name no module of this suite has
    args = ["--gpumem-backend=estimate", "--gpumem-estimate-gpu=H200", "-p", "no:cacheprovider"]
    recorded = pytester.runpytest(*args, "--gpumem-update-baselines")
    assert recorded.ret == 0, "\n".join(recorded.outlines[-60:])
    stored = json.loads((pytester.path / "baselines" / "estimate-H200.json").read_text())
    assert stored["hardware"] == "estimate:H200"
    entry = stored["tests"]["test_estimated.py::test_qlora"]
    assert entry["backend"] == "estimate"
    assert entry["attribution"]["peak"]["weights"] > 0
    result = pytester.runpytest(*args, "--gpumem-json=out.json")
    result.assert_outcomes(passed=1)
    test = json.loads((pytester.path / "out.json").read_text())["tests"][0]
    assert test["hardware"] == "estimate:H200" and test["verdict"]["status"] == "ok"
    assert set(test["sample"]["phases"]["call"]) == {"allocated", "reserved", "device"}


def test_a_model_the_fake_run_cannot_take_gets_a_labelled_analytic_estimate(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = engine.estimate(TINY, H100, advise=False)

    def unsupported(*args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("aten::frobnicate has no meta implementation")

    monkeypatch.setattr(engine, "run_step", unsupported)
    result = engine.estimate(TINY, H100)
    assert result.method == "analytic"
    assert result.reason == "the fake run failed: NotImplementedError: aten::frobnicate has no meta implementation"
    assert result.peak == pytest.approx(fake.peak, rel=0.5)
    # Nothing ran, so no lever may say it did: each is the formula's.
    assert result.levers and {lever.source for lever in result.levers} == {"formula"}
    assert all(lever.basis.startswith("analytic formula, nothing ran: ") for lever in result.levers)
    assert not any("re-ran" in lever.basis for lever in result.levers)
    assert cli.main(["estimate", "--size", "tiny", "--seq", "64"]) == cli.ESTIMATE_FELL_BACK == 4
    out = capsys.readouterr().out
    assert "ANALYTIC ESTIMATE (layer formula, nothing ran; exit status 4): the fake run failed" in out
    assert "estimated-run" not in out and "re-ran" not in out
    assert cli.main(["estimate", "--size", "tiny", "--seq", "64", "--json"]) == 4
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "analytic" and data["reserved_is"] == "formula"
    assert {lever["source"] for lever in data["levers"]} == {"formula"}


# -- what the user's stack does


def _real_peak(path: Path, loop: str, checkpointing: str | None) -> int:
    """The measured step's allocated peak on the CPU meter, for the standard recipe: from_pretrained (nf4),
    prepare_model_for_kbit_training with peft's defaults (or non-reentrant), LoRA r16, AdamW."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    measurement = Measurement(backend.create("cpu"))
    measurement.enter("setup")
    kwargs = {"use_reentrant": False} if checkpointing == "non-reentrant" else None
    model = prepare_model_for_kbit_training(
        loading.load(path, "nf4", True, "bfloat16", None),
        use_gradient_checkpointing=checkpointing is not None,
        gradient_checkpointing_kwargs=kwargs,
    )
    model = get_peft_model(model, LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    measurement.register_model(model)
    measurement.exit("setup")

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        with measurement.phase("call" if name == "step2" else "warmup"):
            yield

    steps = training.train_steps if loop == "trainer" else engine.plain_loop
    with engine._quiet():
        steps(model, batch=TINY.batch, seq=TINY.seq, steps=2, phase=phase, gradient_checkpointing=None)
    return measurement.finish().value("allocated", "call") or 0


def test_the_plain_loop_keeps_one_float32_logits_tensor_more_as_the_cpu_measures(tiny_checkpoint: Path) -> None:
    """``outputs = model(...); outputs.loss.backward()`` keeps the outputs, and so the float32 logits, alive
    through backward: the estimate of that loop is one logits tensor above the Trainer's, exactly as much as
    the cpu backend measures between the two loops for real."""
    logits = TINY.batch * TINY.seq * presets.preset("llama", "tiny").config["vocab_size"] * 4
    real = _real_peak(tiny_checkpoint, "plain", None) - _real_peak(tiny_checkpoint, "trainer", None)
    recipe = dataclasses.replace(TINY, use_cache=False)  # as loading.load leaves the CPU's model
    plain = engine.run_step(recipe, H100, attribute=False).peak
    trainer = engine.run_step(dataclasses.replace(recipe, loop="trainer"), H100, attribute=False).peak
    assert real == plain - trainer == logits


def test_the_checkpointing_variant_is_the_one_peft_sets_and_is_read_back(tiny_checkpoint: Path) -> None:
    """peft's kbit preparation with its defaults checkpoints reentrantly: the estimate builds its model so,
    reads the variant back from it, and says so; with non-reentrant asked, it builds and says that."""
    from peft import prepare_model_for_kbit_training

    with engine._quiet():
        real = prepare_model_for_kbit_training(loading.load(tiny_checkpoint, "nf4", True, "bfloat16", None))
    assert introspect.checkpointing_variant(real) == "reentrant"
    for variant in engine.CHECKPOINTING:
        recipe = dataclasses.replace(TINY, gradient_checkpointing=True, checkpointing=variant)
        step = engine.run_step(recipe, H100, attribute=False)
        assert step.checkpointing == variant
        result = engine.estimate(recipe, H100, advise=False)
        assert any(line.endswith(f"read from the built model: {variant}") for line in result.assumed)
    assert engine.run_step(TINY, H100, attribute=False).checkpointing is None


def test_the_meter_charges_what_the_cuda_caching_allocator_charges() -> None:
    """11 MiB in a fresh 12 MiB segment cannot be split (1 MiB left): CUDA's memory_allocated counts 12 MiB,
    and so does the estimate; a 5 MiB tensor takes 5 MiB of a 20 MiB segment, which reserved counts."""
    from pytest_gpumem.estimate.meter import DEVICE, EstimateMeter

    meter = EstimateMeter(H100)
    meter.begin()
    try:
        big = torch.empty(11 * 2**20, dtype=torch.uint8, device="meta")
        first = meter.mark()
        small = torch.empty(5 * 2**20, dtype=torch.uint8, device="meta")
        second = meter.mark()
        del big, small
    finally:
        meter.end()
    assert first["allocated"][DEVICE] == first["reserved"][DEVICE] == 12 * 2**20
    assert second["allocated"][DEVICE] == 17 * 2**20
    assert second["reserved"][DEVICE] == gpus.reserved_bytes(32 * 2**20, 17 * 2**20)  # the segments, and the share


def test_cli_says_which_recipe_and_which_gpu_figures_it_assumed(capsys: pytest.CaptureFixture[str]) -> None:
    base = ["estimate", "--size", "tiny", "--batch", "2", "--seq", "64", "--no-levers"]
    assert cli.main([*base, "--gpu", "H100", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "reentrant checkpointing" in out and "plain loop" in out and "recipe assumed:" in out
    assert "read from the built model: reentrant" in out
    assert "H100: cuBLAS workspaces (65 MiB) assumed" in out and "(not measured on this GPU)" in out
    args = [*base, "--gpu", "H200", "--gradient-checkpointing", "--checkpointing-variant", "non-reentrant"]
    assert cli.main([*args, "--loop", "trainer", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"]["checkpointing"] == "non-reentrant" and data["recipe"]["loop"] == "trainer"
    assert any("non-reentrant" in line for line in data["assumed"])
    assert any("Trainer" in line for line in data["assumed"])
    assert data["gpu"]["assumed"] == [] and data["gpu"]["measured"] == ["workspace", "context"]
    assert data["reserved_is"] == "modelled"
    assert cli.main([*base, "--gpu", "A100-80GB", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)["gpu"]
    assert gpu["assumed"] == ["workspace", "context"] and gpu["workspace_bytes"] < H100.workspace


UNSEEN = """
import torch
from transformers import AutoModelForCausalLM

def test_loads_on_the_cpu():
    model = AutoModelForCausalLM.from_pretrained({path!r}, device_map="cpu")
    model(torch.randint(0, 100, (1, 16))).logits.sum().backward()

def test_no_tensors():
    assert sum(range(10)) == 45

def test_on_the_fake_gpu():
    torch.ones(1000, device="meta").sum()
"""


def test_a_test_the_estimate_cannot_see_is_said_and_recorded_nowhere(
    pytester: pytest.Pytester, tiny_checkpoint: Path
) -> None:
    """A user's test that loads with device_map="cpu" makes real tensors, which the fake GPU never sees: not
    a 0-byte prediction and baseline, but one warning naming the test, and no record of it."""
    pytester.makepyfile(test_unseen=UNSEEN.format(path=str(tiny_checkpoint)))
    args = ["--gpumem-backend=estimate", "--gpumem-all", "-p", "no:cacheprovider", "--gpumem-json=out.json"]
    result = pytester.runpytest(*args, "--gpumem-update-baselines")
    result.assert_outcomes(passed=3)
    text = "\n".join(result.outlines)
    assert "gpumem: the estimate backend could not see test_unseen.py::test_loads_on_the_cpu: it made most of " in text
    assert "on the fake GPU (the meta device)" in text and "could not see test_unseen.py::test_no_t" not in text
    stored = json.loads((pytester.path / "baselines" / "estimate-H100.json").read_text())["tests"]
    assert set(stored) == {"test_unseen.py::test_no_tensors", "test_unseen.py::test_on_the_fake_gpu"}
    reported = {t["nodeid"] for t in json.loads((pytester.path / "out.json").read_text())["tests"]}
    assert "test_unseen.py::test_loads_on_the_cpu" not in reported


def test_a_kv_cache_left_on_holds_a_copy_of_every_layers_keys_and_values() -> None:
    """from_pretrained leaves Llama's use_cache on: without checkpointing the forward pass copies each layer's
    keys and values into a DynamicCache, which the plain loop's outputs hold through backward (on the H200 the
    copies were 1 GiB of a Mistral 7B step's peak). With checkpointing transformers turns the cache off."""
    config = presets.preset("llama", "tiny").config
    head_dim = config["hidden_size"] // config["num_attention_heads"]
    copies = 2 * config["num_hidden_layers"] * TINY.batch * TINY.seq * config["num_key_value_heads"] * head_dim * 4

    def peak(**changes: Any) -> int:
        return engine.run_step(dataclasses.replace(TINY, **changes), H100, attribute=False).peak

    assert peak(use_cache=True) - peak(use_cache=False) == copies
    assert peak() == peak(use_cache=True)  # the preset's config keeps it on, as the published configs do
    assert peak(use_cache=True, gradient_checkpointing=True) == peak(use_cache=False, gradient_checkpointing=True)


def test_loading_holds_one_16_bit_weight_at_a_time_not_the_whole_model() -> None:
    """from_pretrained quantizes as it loads, so a 4-bit model never exists in 16 bits: the estimate's load
    peaks at what it keeps plus one weight's 16-bit transient, not at the 16-bit model (2.5 GB for 1B)."""
    from pytest_gpumem.estimate.meter import DEVICE, EstimateMeter

    meter = EstimateMeter(H100)
    measurement = Measurement(meter)
    measurement.enter("setup")
    with engine._quiet():
        model = engine.fake_model(engine.model_config(engine.Recipe(size="1b")), "nf4")
    kept = meter.fake_device.current[DEVICE]
    measurement.exit("setup")
    peak = measurement.finish().value("allocated", "setup") or 0
    config = presets.preset("llama", "1b").config
    largest_weight = config["intermediate_size"] * config["hidden_size"] * 2  # one MLP weight in bfloat16
    assert kept <= peak <= kept + largest_weight + 2**20
    assert sum(p.numel() for p in model.parameters()) > 0
