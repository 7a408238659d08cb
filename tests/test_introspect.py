"""Training-setup facts and findings, read from real (tiny) models after a real training step."""

from __future__ import annotations

import warnings

import pytest
import torch

from pytest_gpumem.advise.findings import FINDINGS, Finding, findings
from pytest_gpumem.measure.introspect import Probe, TrainingSetup, decoder_layers, inspect_setup
from pytest_gpumem.models import loading, presets
from pytest_gpumem.models.training import train_steps

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

TINY = presets.preset("llama", "tiny").config
BATCH, SEQ = 2, 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return loading.make_checkpoint(tmp_path_factory.mktemp("checkpoints"), "llama", "tiny")


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    """A tiny Mixtral: transformers 5 keeps its experts as fused 3-D weights, which 4-bit loading skips."""
    path = tmp_path_factory.mktemp("checkpoints") / "mixtral-tiny"
    config = transformers.AutoConfig.for_model(
        "mixtral",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        num_local_experts=4,
        num_experts_per_tok=2,
        use_cache=False,
    )
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(path)
    return path


def lora_model(checkpoint, quant="bf16", *, gradient_checkpointing=True, r=8, double_quant=True):
    model = loading.load(checkpoint, quant, double_quant, "bfloat16", device_map=None)
    return loading.add_lora(model, r=r, gradient_checkpointing=gradient_checkpointing)


def observe(model, **train):
    """One real optimizer step with a probe attached; the probe, detached."""
    with Probe(model) as probe, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train_steps(model, batch=BATCH, seq=SEQ, steps=1, **train)
    return probe


def forward_backward(model, autocast=None):
    """Forward and backward as a hand-written loop does it: in whatever mode the model is."""
    tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=getattr(torch, autocast)) if autocast else torch.autocast("cpu", enabled=False):
        loss = model(input_ids=tokens, labels=tokens).loss
    loss.backward()


def lora_parameters(r, layers=TINY["num_hidden_layers"]):
    """LoRA's parameters on every linear layer of the tiny Llama: r x (in + out) each, from the config alone."""
    h, i = TINY["hidden_size"], TINY["intermediate_size"]
    q = TINY["num_attention_heads"] * (h // TINY["num_attention_heads"])
    kv = TINY["num_key_value_heads"] * (h // TINY["num_attention_heads"])
    per_layer = (h + q) + 2 * (h + kv) + (q + h) + 2 * (h + i) + (i + h)
    return r * per_layer * layers


def keys(found):
    return [f.key for f in found]


def test_qlora_setup_after_a_step(checkpoint):
    model = lora_model(checkpoint, "nf4")
    setup = inspect_setup([model], [], {}, observe(model))
    lora = lora_parameters(8)
    assert (setup.arch, setup.num_layers, setup.hidden_size, setup.intermediate_size, setup.vocab_size) == (
        "llama",
        2,
        128,
        256,
        1024,
    )
    assert (setup.num_heads, setup.num_kv_heads, setup.head_dim, setup.attention) == (4, 2, 32, "sdpa")
    assert (setup.batch, setup.seq, setup.training, setup.use_cache) == (BATCH, SEQ, True, False)
    assert (setup.gradient_checkpointing, setup.checkpointing_effective) == (True, True)
    assert (setup.quant, setup.double_quant, setup.linear_layers, setup.quantized_layers) == ("nf4", True, 14, 14)
    assert setup.unquantized == []
    assert (setup.lora_r, setup.lora_alpha, setup.lora_modules) == (8, 16, 14)
    assert setup.lora_targets == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    assert setup.lora_params == setup.trainable_params == lora
    assert setup.trainable_bytes == 4 * lora  # peft keeps adapters in float32
    # prepare_model_for_kbit_training upcast the norms, embeddings and lm_head: a float32 residual stream and
    # float32 logits, while the 4-bit matmuls compute in bfloat16.
    assert (setup.weight_dtype, setup.compute_dtype, setup.matmul_dtype) == ("float32", "bfloat16", "bfloat16")
    assert (setup.hidden_dtype, setup.logits_dtype, setup.autocast) == ("float32", "float32", None)
    found = findings(setup)
    assert keys(found) == ["fp32_hidden", "fp32_logits"]
    assert "16.00 KiB per layer output for batch 2 x seq 16" in found[0].message  # 2 x 16 x 128 x 4 B
    assert "128.00 KiB for batch 2 x seq 16 x vocab 1024" in found[1].message  # 2 x 16 x 1024 x 4 B


@pytest.mark.parametrize("gradient_checkpointing", [True, False])
def test_bf16_lora_keeps_bf16_activations_and_checkpointing_is_seen_to_recompute(checkpoint, gradient_checkpointing):
    model = lora_model(checkpoint, gradient_checkpointing=gradient_checkpointing, r=4)
    setup = inspect_setup([model], [], {}, observe(model))
    assert setup.gradient_checkpointing is gradient_checkpointing
    assert setup.checkpointing_effective is gradient_checkpointing
    assert (setup.weight_dtype, setup.compute_dtype, setup.matmul_dtype) == ("bfloat16",) * 3
    assert (setup.hidden_dtype, setup.logits_dtype) == ("bfloat16", "bfloat16")
    assert (setup.quant, setup.linear_layers, setup.quantized_layers, setup.unquantized) == (None, 14, 0, [])
    assert setup.lora_params == setup.trainable_params == lora_parameters(4)
    assert findings(setup) == []


@pytest.mark.parametrize(("quant", "double_quant"), [("nf4", False), ("fp4", True), ("int8", False)])
def test_quantization_is_read_from_the_layers(checkpoint, quant, double_quant):
    model = loading.load(checkpoint, quant, double_quant, "bfloat16", device_map=None)
    setup = inspect_setup([model], [], {}, None)
    assert (setup.quant, setup.linear_layers, setup.quantized_layers) == (quant, 14, 14)
    assert setup.double_quant is (double_quant if quant != "int8" else None)
    assert setup.compute_dtype == "bfloat16"
    assert findings(setup) == []


def test_weights_count_logical_parameters_and_every_storage_once(checkpoint):
    bf16 = loading.load(checkpoint, "bf16", True, "bfloat16", device_map=None)
    nf4 = loading.load(checkpoint, "nf4", True, "bfloat16", device_map=None)
    dense, quantized = inspect_setup([bf16], [], {}, None), inspect_setup([nf4], [], {}, None)
    assert dense.total_params == quantized.total_params == sum(p.numel() for p in bf16.parameters())
    assert dense.weight_bytes == sum(p.nbytes for p in bf16.parameters()) + sum(b.nbytes for b in bf16.buffers())
    # The 4-bit checkpoint's own accounting: packed weights and statistics as saved (less bitsandbytes' serialized
    # metadata), the non-persistent buffers (rotary tables), and the nested statistics' float32 offsets.
    saved = sum(t.nbytes for name, t in nf4.state_dict().items() if ".quant_state." not in name)
    persistent = set(nf4.state_dict())
    rotary = sum(b.nbytes for name, b in nf4.named_buffers() if name not in persistent)
    offsets = 4 * quantized.quantized_layers
    assert quantized.weight_bytes == saved + rotary + offsets
    assert quantized.weight_bytes < dense.weight_bytes
    both = inspect_setup([nf4, bf16], [], {}, None)
    assert both.weight_bytes == dense.weight_bytes + quantized.weight_bytes
    assert both.arch == "llama" and both.quant == "nf4"  # the first model is the one trained


def test_optimizer_state_is_counted_after_a_step(checkpoint):
    model = lora_model(checkpoint, gradient_checkpointing=False, r=4)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert inspect_setup([model], [optimizer], {}, None).optimizer_state_bytes is None  # not stepped yet
    forward_backward(model)
    optimizer.step()
    setup = inspect_setup([model], [optimizer], {"batch": 8, "seq": 512}, None)
    steps = sum(state["step"].nbytes for state in optimizer.state.values())
    assert setup.optimizer == "AdamW"
    assert setup.optimizer_state_bytes == 2 * 4 * lora_parameters(4) + steps  # two float32 moments
    assert (setup.batch, setup.seq) == (8, 512)  # knobs win over the probe (none here)


def test_eval_mode_makes_checkpointing_a_no_op(checkpoint):
    model = lora_model(checkpoint, r=4)
    model.eval()
    with Probe(model) as probe:
        forward_backward(model)
    setup = inspect_setup([model], [], {}, probe)
    assert (setup.training, setup.gradient_checkpointing, setup.checkpointing_effective) == (False, True, False)
    found = findings(setup)
    assert keys(found) == ["checkpointing_eval"]
    assert found[0].message == (
        "gradient checkpointing is enabled but the model ran the step in eval mode, so nothing is recomputed "
        "and 2 decoder layers keep all their activations: call model.train()"
    )


def test_eval_mode_is_the_layers_own_under_a_wrapper_in_train_mode(checkpoint):
    """from_pretrained leaves the model in eval mode; the PeftModel made around it starts in train mode.
    Checkpointing asks the layers, so the step runs in eval mode."""
    model = lora_model(checkpoint, r=4)
    model.get_base_model().eval()
    assert model.training and not model.get_base_model().training
    with Probe(model) as probe:
        forward_backward(model)
    setup = inspect_setup([model], [], {}, probe)
    assert (setup.training, setup.checkpointing_effective) == (False, False)
    assert keys(findings(setup)) == ["checkpointing_eval"]


def test_whether_the_loop_holds_its_outputs_through_backward_is_seen(checkpoint):
    """``outputs = model(...)`` keeps the logits alive through backward; ``model(...).loss`` lets them go."""
    model = lora_model(checkpoint, r=4)
    tokens = torch.randint(0, model.config.vocab_size, (BATCH, SEQ))
    with Probe(model) as probe:
        model(input_ids=tokens, labels=tokens).loss.backward()
    assert (probe.observed.backward, probe.observed.outputs_kept) == (True, False)
    with Probe(model) as probe:
        outputs = model(input_ids=tokens, labels=tokens)
        outputs.loss.backward()
    assert (probe.observed.backward, probe.observed.outputs_kept) == (True, True)
    assert inspect_setup([model], [], {}, probe).outputs_kept is True


def test_a_checkpointing_flag_set_by_hand_recomputes_nothing(checkpoint):
    model = lora_model(checkpoint, gradient_checkpointing=False, r=4)
    model.get_base_model().model.gradient_checkpointing = True  # a common mistake: the flag, not the method
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        assert model.get_base_model().is_gradient_checkpointing  # transformers too thinks it is enabled
    setup = inspect_setup([model], [], {}, observe(model))
    assert (setup.training, setup.gradient_checkpointing, setup.checkpointing_effective) == (True, True, False)
    assert keys(findings(setup)) == ["checkpointing_ineffective"]


@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_use_cache_during_training_keeps_the_kv_cache(checkpoint, gradient_checkpointing):
    model = lora_model(checkpoint, gradient_checkpointing=gradient_checkpointing, r=4)
    model.config.use_cache = True
    setup = inspect_setup([model], [], {}, observe(model))
    # With checkpointing on, transformers itself turns the cache off in training.
    assert setup.use_cache is not gradient_checkpointing
    found = findings(setup)
    if gradient_checkpointing:
        assert found == []
    else:
        assert keys(found) == ["use_cache"]
        # k and v x 2 layers x 32 tokens x 2 kv heads x 32 dims x 2 B
        assert "KV cache of 2 decoder layers (16.00 KiB for batch 2 x seq 16)" in found[0].message


def test_autocast_requested_but_not_applied(checkpoint):
    model = lora_model(checkpoint, "fp32", gradient_checkpointing=False, r=4)
    with Probe(model) as probe:
        forward_backward(model)
    setup = inspect_setup([model], [], {"autocast": "bfloat16"}, probe)
    assert (setup.autocast, setup.matmul_dtype, setup.hidden_dtype) == (None, "float32", "float32")
    assert keys(findings(setup)) == ["bf16_not_applied"]
    with Probe(model) as probe:
        forward_backward(model, autocast="bfloat16")
    setup = inspect_setup([model], [], {"autocast": "bfloat16"}, probe)
    assert (setup.autocast, setup.matmul_dtype, setup.logits_dtype) == ("bfloat16", "bfloat16", "bfloat16")
    assert setup.hidden_dtype == "float32"  # mixed precision keeps the residual stream in the weights' dtype
    assert findings(setup) == []


def test_experts_left_unquantized_are_named(moe_checkpoint):
    model = loading.load(moe_checkpoint, "nf4", True, "bfloat16", device_map=None)
    setup = inspect_setup([model], [], {}, None)
    assert (setup.arch, setup.linear_layers, setup.quantized_layers) == ("mixtral", 12, 8)
    assert setup.unquantized == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    found = findings(setup)
    assert keys(found) == ["quant_incomplete"]
    assert found[0].message == (
        "a nf4 quantization config is present but only 8 of 12 decoder linear layers are 4-bit; "
        "left unquantized: mlp.experts.down_proj, mlp.experts.gate_up_proj"
    )


def test_the_probe_observes_training_forwards_only_and_detaches(checkpoint):
    model = lora_model(checkpoint, gradient_checkpointing=False, r=4)

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    before = hooks()
    probe = Probe(model)
    assert hooks() > before
    tokens = torch.zeros(3, 5, dtype=torch.long)
    with torch.no_grad():
        model(input_ids=tokens)
    assert probe.observed.forwards == 0
    embeds = model.get_input_embeddings()(torch.zeros(4, 7, dtype=torch.long))
    model(inputs_embeds=embeds)
    model(input_ids=tokens)
    assert (probe.observed.forwards, probe.observed.batch, probe.observed.seq) == (2, 4, 7)  # the most tokens
    assert probe.observed.backward is False
    probe.detach()
    assert hooks() == before
    model(input_ids=tokens)
    assert probe.observed.forwards == 2


def test_an_empty_registration_gives_an_empty_setup():
    probe = Probe(object())  # not a module: nothing to watch, nothing to fail
    assert inspect_setup([], [], {}, probe) == TrainingSetup()
    assert inspect_setup([], [], {"batch": 4}, None).batch == 4
    assert findings(TrainingSetup()) == []


def test_decoder_layers_are_not_taken_for_expert_lists():
    class DecoderLayer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(8))

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList(DecoderLayer() for _ in range(2))

    model = Model()
    assert decoder_layers(model) == list(model.layers)


@pytest.mark.parametrize(
    ("setup", "expected"),
    [
        # unknown facts decide nothing
        (TrainingSetup(gradient_checkpointing=True), []),
        (TrainingSetup(use_cache=True), []),
        (TrainingSetup(hidden_dtype="float32"), []),
        (TrainingSetup(quant="nf4", linear_layers=0), []),
        # each check alone
        (TrainingSetup(gradient_checkpointing=True, training=False), ["checkpointing_eval"]),
        (TrainingSetup(gradient_checkpointing=False, training=False), []),
        (
            TrainingSetup(gradient_checkpointing=True, training=True, checkpointing_effective=False),
            ["checkpointing_ineffective"],
        ),
        (TrainingSetup(gradient_checkpointing=True, training=True, checkpointing_effective=None), []),
        (TrainingSetup(use_cache=True, training=True), ["use_cache"]),
        (TrainingSetup(use_cache=True, training=False), []),
        (TrainingSetup(hidden_dtype="float32", compute_dtype="bfloat16"), ["fp32_hidden"]),
        (TrainingSetup(hidden_dtype="float32", compute_dtype="float32", autocast="bfloat16"), []),
        (TrainingSetup(logits_dtype="float32", compute_dtype="float16"), ["fp32_logits"]),
        (TrainingSetup(logits_dtype="float32", compute_dtype="float32", autocast="bfloat16"), ["fp32_logits"]),
        (TrainingSetup(logits_dtype="float32", compute_dtype="float32"), []),
        (TrainingSetup(autocast_requested="float16", matmul_dtype="float32"), ["bf16_not_applied"]),
        (TrainingSetup(autocast_requested="float16", matmul_dtype="float16"), []),
        (TrainingSetup(quant="nf4", compute_dtype="bfloat16", matmul_dtype="float32"), ["bf16_not_applied"]),
        (TrainingSetup(quant="int8", linear_layers=14, quantized_layers=12), ["quant_incomplete"]),
        (TrainingSetup(quant="gptq", linear_layers=14, quantized_layers=0), []),
        # all at once, in order of importance
        (
            TrainingSetup(
                gradient_checkpointing=True,
                training=False,
                use_cache=True,
                hidden_dtype="float32",
                logits_dtype="float32",
                compute_dtype="bfloat16",
                quant="nf4",
                matmul_dtype="float32",
                linear_layers=3,
                quantized_layers=2,
            ),
            ["checkpointing_eval", "fp32_hidden", "fp32_logits", "bf16_not_applied", "quant_incomplete"],
        ),
    ],
)
def test_findings_need_their_facts(setup, expected):
    found = findings(setup)
    assert keys(found) == expected
    assert all(isinstance(f, Finding) and f.key in FINDINGS and "\n" not in f.message for f in found)
