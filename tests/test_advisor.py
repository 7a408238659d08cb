"""The advisor, fed given attributions and setups: which levers apply, what they are estimated to save (by
hand, below), their order, the recommendation, and measured levers. The layer model it estimates from is
checked against what a real tiny model's decoder layers keep, on the CPU."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pytest_gpumem.advise.advisor import advise
from pytest_gpumem.advise.findings import Finding
from pytest_gpumem.advise.memory_model import LayerBytes, Precision, Shape, adam_8bit_bytes, layer_bytes, nf4_bytes
from pytest_gpumem.core.sample import LEVERS, Attribution, Breakdown
from pytest_gpumem.measure.introspect import Probe, TrainingSetup, decoder_layers, inspect_setup
from pytest_gpumem.measure.meters.tracker import StorageTracker
from pytest_gpumem.models import loading

ALL_LINEAR = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
KNOBS = {
    "batch": 4,
    "seq": 32,
    "accumulation": 1,
    "steps": 2,
    "gradient_checkpointing": False,
    "autocast": None,
    "optimizer": "adamw",
}
# A QLoRA setup as prepare_model_for_kbit_training leaves it: 4 layers of width 64, float32 hidden states.
QLORA = TrainingSetup(
    arch="llama",
    num_layers=4,
    hidden_size=64,
    intermediate_size=128,
    vocab_size=1000,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
    attention="sdpa",
    training=True,
    use_cache=False,
    gradient_checkpointing=False,
    weight_dtype="float32",
    compute_dtype="bfloat16",
    hidden_dtype="float32",
    logits_dtype="float32",
    quant="nf4",
    double_quant=True,
    linear_layers=28,
    quantized_layers=28,
    lora_r=8,
    lora_alpha=16,
    lora_targets=ALL_LINEAR,
    lora_modules=28,
    lora_params=10_000,
    total_params=200_000,
    trainable_params=10_000,
    trainable_bytes=40_000,
    weight_bytes=1_000_000,
    batch=4,
    seq=32,
)
PEAK = Breakdown(weights=1_000_000, gradients=0, optimizer=100_000, activations=2_000_000, layer_activations=1_500_000)
STAGES = {
    "forward": Breakdown(1_000_000, 0, 100_000, 1_900_000, 1_500_000),
    "backward": PEAK,
    "optimizer": Breakdown(1_000_000, 50_000, 150_000, 10_000, 0),
}


def attribution(device: str = "cpu", peak: Breakdown = PEAK, stages: dict | None = None) -> Attribution:
    # On the CPU SDPA's flash kernel keeps activations linear in the sequence: simple numbers by hand.
    return Attribution(peak=peak, device=device, stage="backward", stages=dict(STAGES if stages is None else stages))


def levers_of(advice) -> dict[str, int]:
    return {lever.key: lever.saving for lever in advice.levers}


# -- which levers apply


@pytest.mark.parametrize(
    ("setup", "knobs", "findings", "present", "absent"),
    [
        (QLORA, KNOBS, [], {"batch", "checkpointing", "seq", "bf16", "rank", "optimizer"}, {"lora", "qlora", "fix"}),
        (QLORA, {**KNOBS, "batch": 1}, [], {"seq"}, {"batch"}),
        (
            replace(QLORA, gradient_checkpointing=True),
            {**KNOBS, "gradient_checkpointing": True},
            [],
            set(),
            {"checkpointing"},
        ),
        (
            replace(QLORA, gradient_checkpointing=True, checkpointing_effective=False),
            {**KNOBS, "gradient_checkpointing": True},
            [Finding("checkpointing_ineffective", "enabled but nothing recomputed")],
            {"fix"},
            {"checkpointing"},
        ),
        (QLORA, {**KNOBS, "autocast": "bfloat16"}, [], set(), {"bf16"}),
        (QLORA, {**KNOBS, "optimizer": "adamw8bit"}, [], set(), {"optimizer"}),
        (QLORA, {**KNOBS, "seq": 1}, [], set(), {"seq"}),
        (replace(QLORA, lora_r=1), KNOBS, [], set(), {"rank"}),
        (
            replace(
                QLORA,
                quant=None,
                quantized_layers=0,
                hidden_dtype="bfloat16",
                weight_dtype="bfloat16",
                compute_dtype="bfloat16",
            ),
            KNOBS,
            [],
            {"qlora", "rank"},
            {"bf16", "lora"},
        ),
        (
            replace(
                QLORA,
                quant=None,
                quantized_layers=0,
                hidden_dtype="bfloat16",
                weight_dtype="bfloat16",
                compute_dtype="bfloat16",
                lora_r=None,
                lora_targets=[],
                lora_modules=0,
                lora_params=0,
                trainable_params=200_000,
                trainable_bytes=400_000,
            ),
            KNOBS,
            [],
            {"lora", "qlora"},
            {"rank"},
        ),
        (QLORA, KNOBS, [Finding("use_cache", "use_cache=True during training")], {"fix"}, set()),
    ],
    ids=[
        "qlora",
        "batch-1",
        "checkpointing-on",
        "checkpointing-ineffective",
        "autocast-on",
        "adamw8bit",
        "seq-1",
        "rank-1",
        "bf16-lora",
        "full-fine-tuning",
        "use-cache",
    ],
)
def test_levers_that_apply(setup, knobs, findings, present, absent):
    keys = set(levers_of(advise(attribution(), setup, findings, None, knobs)))
    assert present <= keys
    assert not absent & keys


# -- estimates, by hand


def test_batch_halves_activations_and_keeps_gradients_alive_between_micro_batches():
    advice = advise(attribution(), QLORA, [], None, KNOBS)
    (batch,) = [lever for lever in advice.levers if lever.key == "batch"]
    # Backward's moment: 1e6 weights + 50_000 gradients held from the first micro-batch + 1e5 optimizer +
    # half of 2e6 activations = 2_150_000 (forward: 2_100_000; the optimizer step: 1_205_000).
    assert batch.saving == 3_100_000 - 2_150_000
    assert batch.action == "per-device batch 4 -> 2 with gradient accumulation x2 (effective batch 4 kept)"
    assert batch.source == "estimated" and batch.estimated == batch.saving
    assert "activations 1.91 MiB at the peak scale with the batch" in batch.basis


@pytest.mark.parametrize(
    ("batch", "accumulation", "action"),
    [
        (6, 2, "per-device batch 6 -> 3 with gradient accumulation x2 (effective batch 12 kept)"),
        (3, 1, "per-device batch 3 -> 1 with gradient accumulation x3 (effective batch 3 kept)"),
    ],
)
def test_batch_keeps_the_effective_batch(batch, accumulation, action):
    advice = advise(attribution(), QLORA, [], None, {**KNOBS, "batch": batch, "accumulation": accumulation})
    assert [lever.action for lever in advice.levers if lever.key == "batch"] == [action]


def test_checkpointing_keeps_checkpoints_and_recomputes_one_layer():
    advice = advise(attribution(), QLORA, [], None, KNOBS)
    # Checkpoints: 4 layers x 128 tokens x 64 x 4 bytes = 131_072. At backward's moment the layers hold
    # them alone: 1e6 + 1e5 + 131_072 + 500_000 = 1_731_072; recomputing one layer (1.5e6 / 4), once the loss
    # is gone: 1e6 + 1e5 + 131_072 + 375_000 = 1_606_072.
    assert levers_of(advice)["checkpointing"] == 3_100_000 - 1_731_072


def test_shorter_sequences_halve_linear_activations_and_quarter_attention_probabilities():
    linear = levers_of(advise(attribution("cpu"), QLORA, [], None, KNOBS))["seq"]
    # half of all activations: 1e6 + 1e5 + 1e6 = 2_100_000 (forward: 2_050_000)
    assert linear == 1_000_000
    # On CUDA, float32 queries with grouped key/value heads run SDPA's math kernel, which keeps the
    # attention probabilities: a quarter of those is left, so the saving is larger, but below a quarter of all.
    advice = advise(attribution("cuda:0"), QLORA, [], None, KNOBS)
    (seq,) = [lever for lever in advice.levers if lever.key == "seq"]
    assert linear < seq.saving < 3_100_000 - (1_100_000 + 1_500_000 // 4 + 250_000)
    assert "quadratic" in seq.basis


def test_optimizer_8bit_saves_three_quarters_of_large_states_and_nothing_on_small_ones():
    state = Breakdown(weights=1_000_000, gradients=0, optimizer=1_000_000, activations=0)
    wide = replace(
        QLORA,
        hidden_size=4096,
        intermediate_size=4096,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        lora_targets=["q_proj"],
        lora_modules=4,
        lora_params=4 * 2 * 8 * 4096,
        trainable_params=4 * 2 * 8 * 4096,
    )
    advice = advise(attribution(peak=state, stages={}), wide, [], None, {**KNOBS, "batch": None, "seq": None})
    # every LoRA matrix has 8 x 4096 elements: two uint8 states and 2 float32 absmax per 256 elements
    assert adam_8bit_bytes(8 * 4096) == 2 * 8 * 4096 + 8 * 8 * 4096 // 256
    assert levers_of(advice)["optimizer"] == round(1_000_000 * (1 - (2 + 8 / 256) / 8))
    # width 64, r 8: every LoRA matrix is under bitsandbytes' 4096 elements and keeps 32-bit state
    advice = advise(attribution(peak=state, stages={}), QLORA, [], 1, {**KNOBS, "batch": None, "seq": None})
    (optimizer,) = [lever for lever in advice.levers if lever.key == "optimizer"]
    assert optimizer.saving == 0
    assert "saves nothing" in optimizer.basis and "stay 32-bit" in optimizer.basis
    assert "optimizer" not in advice.recommended


def test_rank_halves_lora_parameters_gradients_and_state():
    peak = Breakdown(weights=1_000_000, gradients=30_000, optimizer=80_000, activations=0)
    advice = advise(attribution(peak=peak, stages={}), QLORA, [], None, {**KNOBS, "batch": None, "seq": None})
    # 10_000 float32 LoRA parameters: 20_000 bytes of weights, half the gradients and optimizer state
    assert levers_of(advice)["rank"] == 20_000 + 15_000 + 40_000


def test_use_cache_costs_what_the_attention_kernel_does_not_keep_anyway():
    finding = [Finding("use_cache", "use_cache=True during training")]
    fused = advise(attribution("cpu"), QLORA, finding, 1, KNOBS)
    (fix,) = fused.levers[:1]
    assert (fix.key, fix.saving) == ("fix", 0) and "keeps anyway" in fix.basis and fix.key not in fused.recommended
    # math SDPA (CUDA, float32, GQA) keeps repeated copies: the cache, 2 x 4 layers x 128 tokens x 32 x 4 bytes,
    # is extra
    (fix,) = advise(attribution("cuda:0"), QLORA, finding, None, KNOBS).levers[:1]
    assert fix.saving == 2 * 4 * 128 * 32 * 4


def test_qlora_that_costs_more_than_it_saves_is_reported_and_never_recommended():
    # a bf16 LoRA model whose parameters are mostly embeddings: upcasting them to float32 costs more than
    # 4-bit linear layers free, and float32 hidden states grow the activations
    bf16 = replace(
        QLORA,
        quant=None,
        quantized_layers=0,
        hidden_dtype="bfloat16",
        weight_dtype="bfloat16",
        compute_dtype="bfloat16",
        total_params=2_000_000,
    )
    advice = advise(attribution(), bf16, [], 10**12, KNOBS)
    (qlora,) = [lever for lever in advice.levers if lever.key == "qlora"]
    assert qlora.saving < 0 and "costs" in qlora.basis
    assert "qlora" not in advice.recommended and advice.recommended  # the best effort is made of the others


def test_weights_in_4bit():
    assert nf4_bytes(64 * 256, double_quant=False) == 64 * 256 // 2 + 4 * 256
    assert nf4_bytes(64 * 256, double_quant=True) == 64 * 256 // 2 + 256 + 4


# -- order, findings, recommendation


def test_levers_are_ordered_by_cost_to_quality_and_findings_come_first():
    finding = Finding("checkpointing_eval", "gradient checkpointing is enabled but the model ran in eval mode")
    setup = replace(QLORA, gradient_checkpointing=True, training=False)
    advice = advise(attribution(), setup, [finding], None, {**KNOBS, "gradient_checkpointing": True})
    assert advice.findings == [finding.message]
    keys = [lever.key for lever in advice.levers]
    assert keys == sorted(keys, key=LEVERS.index)
    assert keys[0] == "fix" and "checkpointing" not in keys
    assert advice.levers[0].action.startswith("call model.train()")
    assert advice.recommended == [] and advice.needed is None


@pytest.mark.parametrize(
    ("needed", "recommended"),
    [
        (900_000, ["batch"]),  # batch (950_000) covers it: not checkpointing, which frees more
        (1_200_000, ["checkpointing"]),  # one lever of the same cost beats two
        # batch and seq together free 3/4 of the activations, not all: 1_500_000 needs checkpointing
        (1_500_000, ["batch", "checkpointing"]),
    ],
)
def test_the_cheapest_in_quality_that_covers_what_is_needed(needed, recommended):
    advice = advise(attribution(), QLORA, [], needed, KNOBS)
    savings = levers_of(advice)
    assert savings["checkpointing"] > savings["seq"] > savings["batch"] >= 900_000
    assert advice.recommended == recommended
    assert advice.needed == needed


def test_fixes_come_before_everything_and_are_free():
    finding = [Finding("checkpointing_eval", "eval mode")]
    setup = replace(QLORA, gradient_checkpointing=True, training=False)
    advice = advise(attribution(), setup, finding, 1_000_000, {**KNOBS, "gradient_checkpointing": True})
    assert advice.recommended == ["fix"]


def test_when_nothing_covers_it_the_closest_combination_is_recommended():
    advice = advise(attribution(), QLORA, [], 10**12, KNOBS)
    savings = levers_of(advice)
    assert advice.recommended
    assert all(savings[key] > 0 for key in advice.recommended)
    assert "checkpointing" in advice.recommended


# -- measured levers


def test_a_measure_makes_knob_levers_measured_with_the_right_overrides():
    calls: list[dict] = []
    runs = {
        (): 5_000_000,
        (("accumulation", 2), ("batch", 2)): 3_000_000,
        (("gradient_checkpointing", True),): 1_000_000,
        (("seq", 16),): 3_500_000,
        (("autocast", "bfloat16"),): 4_000_000,
        (("optimizer", "adamw8bit"),): 5_100_000,
    }

    def measure(overrides: dict) -> int:
        calls.append(overrides)
        return runs[tuple(sorted(overrides.items()))]

    advice = advise(attribution(), QLORA, [], None, KNOBS, measure)
    assert calls[0] == {} and len(calls) == len(runs)  # the reference once, then one run per knob lever
    assert {tuple(sorted(call.items())) for call in calls[1:]} == set(runs) - {()}
    by_key = {lever.key: lever for lever in advice.levers}
    assert by_key["batch"].source == "measured" and by_key["batch"].saving == 2_000_000
    assert by_key["batch"].estimated == 950_000
    assert by_key["batch"].basis == "re-ran the step with batch 2, accumulation 2: peak 4.77 MiB -> 2.86 MiB"
    assert by_key["checkpointing"].saving == 4_000_000
    assert by_key["optimizer"].saving == -100_000 and "costs" in by_key["optimizer"].basis
    assert by_key["rank"].source == "estimated"  # not a knob of the step


def test_a_failed_run_falls_back_to_the_estimate_with_the_reason():
    def measure(overrides: dict) -> int:
        if overrides.get("gradient_checkpointing"):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return 1_000_000

    advice = advise(attribution(), QLORA, [], None, KNOBS, measure)
    (checkpointing,) = [lever for lever in advice.levers if lever.key == "checkpointing"]
    assert checkpointing.source == "estimated" and checkpointing.saving == checkpointing.estimated
    assert checkpointing.basis.startswith("could not be measured (OutOfMemoryError: CUDA out of memory.")

    def broken(overrides: dict) -> int:
        raise RuntimeError("the step needs a dataset")

    advice = advise(attribution(), QLORA, [], None, KNOBS, broken)
    assert all(lever.source == "estimated" for lever in advice.levers)
    assert "the reference run failed (RuntimeError: the step needs a dataset)" in advice.levers[0].basis


def test_without_attribution_the_peak_is_modelled_from_the_setup():
    advice = advise(None, QLORA, [], None, KNOBS)
    savings = levers_of(advice)
    assert savings["batch"] > 0 and savings["checkpointing"] > 0
    assert all(lever.basis.startswith("modelled from the setup") for lever in advice.levers)
    assert advise(None, TrainingSetup(), [], 1, {}).levers == []


# -- the layer model, against a real tiny model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    pytest.importorskip("transformers")
    return loading.make_checkpoint(tmp_path_factory.mktemp("checkpoints"), "llama", "tiny")


@pytest.mark.parametrize(
    ("quant", "autocast", "attention"),
    [
        ("nf4", None, "sdpa"),
        ("nf4", "bfloat16", "sdpa"),
        ("nf4", None, "eager"),
        ("bf16", None, "sdpa"),
        ("fp32", "bfloat16", "sdpa"),
    ],
)
def test_the_layer_model_is_what_real_decoder_layers_keep(checkpoint, quant, autocast, attention):
    model = loading.load(checkpoint, quant, True, "bfloat16" if quant != "fp32" else "float32", None)
    model.set_attn_implementation(attention)
    model = loading.add_lora(model, r=8, gradient_checkpointing=False)
    layers = decoder_layers(model)
    tracker, marks = StorageTracker(), []
    layers[0].register_forward_pre_hook(lambda *_: marks.append(tracker.current.get("cpu", 0)))
    outputs: list[torch.Tensor] = []
    layers[-1].register_forward_hook(lambda *_: marks.append(tracker.current.get("cpu", 0)))
    layers[-1].register_forward_hook(lambda _m, _i, out: outputs.append(out[0] if isinstance(out, tuple) else out))
    tokens = torch.randint(0, 1024, (4, 64))
    with Probe(model) as probe, tracker, torch.autocast("cpu", torch.bfloat16, enabled=bool(autocast)):
        model(input_ids=tokens, labels=tokens)
    setup = inspect_setup([model], [], {"batch": 4, "seq": 64, "autocast": autocast}, probe)
    shape = Shape.of(setup)
    assert shape is not None
    modelled = layer_bytes(shape, Precision.of(setup, {"autocast": autocast}), attention, "cpu").total(256, 64)
    # Between the first layer's start and the last one's end: what the layers keep (the first layer's norm
    # keeps nothing of the embeddings' output, which needs no gradient), plus the last layer's output, which
    # the final norm keeps only where it is float32 (else a float32 copy, outside the layers).
    last = outputs[0].nbytes if outputs[0].dtype != torch.float32 else 0
    measured = (marks[1] - marks[0] - last) / len(layers)
    assert modelled == pytest.approx(measured, rel=0.03)


def test_layer_bytes_by_hand():
    shape = Shape(layers=1, hidden=8, intermediate=16, heads=2, kv_heads=2, head_dim=4, vocab=10)
    qlora = Precision(hidden=4, weight=4, adapter=4, quantized=True, lora_r=2, lora_targets=tuple(ALL_LINEAR))
    # norms 2 x (32 + 4), less the rsqrt of the first layer's input norm (its input needs no grad); q/k/v
    # input 32 + 3 LoRA outputs 3 x 8; o's LoRA output 8; fused attention 4 x (8 + 8 + 8 + 8) + log-sum-exp
    # 2 x 4; gate/up input 32 + 2 x 8; gate, SiLU, up 3 x 64; down 64 + 8
    assert layer_bytes(shape, qlora, "sdpa", "cpu") == LayerBytes(68 + 56 + 8 + 136 + 48 + 192 + 72, 0.0, 0.0)
    # grouped key/value heads on CUDA in float32: math SDPA keeps scaled q, repeated k and v (3 x 32), the
    # output's copy for o_proj (32), and float32 probabilities (2 heads x 4 bytes per position)
    gqa = replace(shape, kv_heads=1)
    assert layer_bytes(gqa, qlora, "sdpa", "cuda") == LayerBytes(68 + 56 + 8 + 96 + 32 + 48 + 192 + 72, 8.0, 0.0)
