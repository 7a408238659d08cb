"""Attribution, advice and snapshots through the plugin (pytester, cpu backend, real tensors and models)."""

from __future__ import annotations

import json
import pickle

import pytest

MiB = 2**20

TRAIN_SUITE = """
import pytest, torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(256, 256, bias=False) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x

@pytest.mark.gpumem
def test_train(gpumem):
    model = Net()  # 2 x 256 KiB of weights
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    batch = {batch}
    for step in (1, 2):
        with gpumem.phase(f"step{{step}}"):
            model(torch.randn(batch, 256)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
"""


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest("--gpumem-json=out.json", *args)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"]: t for t in doc["tests"]}


def test_a_passing_test_is_attributed_only_when_asked(pytester):
    """The fast path measures a passing test with the meter alone; ``--gpumem-attribute=always`` attributes
    every test as it runs."""
    pytester.makepyfile(test_train=TRAIN_SUITE.format(batch=64))
    result, tests = run(pytester)
    result.assert_outcomes(passed=1)
    assert tests["test_train.py::test_train"]["sample"]["attribution"] is None
    result, tests = run(pytester, "--gpumem-attribute=always")
    result.assert_outcomes(passed=1)
    test = tests["test_train.py::test_train"]
    attribution = test["sample"]["attribution"]
    peak = attribution["peak"]
    assert peak["weights"] == 2 * 256 * 256 * 4
    assert (
        sum(peak[k] for k in ("weights", "gradients", "optimizer", "activations"))
        == (test["sample"]["phases"]["call"]["allocated"]["cpu"])
    )
    assert attribution["phase"] in ("step1", "step2")
    result.stdout.fnmatch_lines(["*largest consumer*", "test_train.py::test_train*new*%"])


def test_regression_shows_the_grown_consumer_beside_the_baseline(pytester):
    pytester.makepyfile(test_train=TRAIN_SUITE.format(batch=64))
    pytester.runpytest("--gpumem-update-baselines").assert_outcomes(passed=1)
    stored = json.loads((pytester.path / "baselines" / "cpu.json").read_text())["tests"]
    assert stored["test_train.py::test_train"]["attribution"]["peak"]["weights"] == 2 * 256 * 256 * 4

    pytester.makepyfile(test_train=TRAIN_SUITE.format(batch=4096))  # the activations grow 64-fold
    result, tests = run(pytester, "--gpumem-explain=none")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "gpumem: regression over baseline*",
            "*grew      activations +*",
            "test_train.py::test_train:",
            "*consumer*baseline*now*delta*",
            "*weights*512.00 KiB*512.00 KiB*+0 B*",
            "*activations*",
        ]
    )
    advice = tests["test_train.py::test_train"]["advice"]
    assert advice is not None and advice["needed"] > 0


def test_snapshot_is_written_for_regressed_tests_only(pytester):
    pytester.makepyfile(
        test_two="""
        import pytest, torch

        @pytest.mark.gpumem(budget="1 MiB")
        def test_big():
            x = torch.ones(2 * 2**20, dtype=torch.uint8)

        @pytest.mark.gpumem(budget="1 MiB")
        def test_small():
            x = torch.ones(2**10, dtype=torch.uint8)
        """
    )
    result, tests = run(pytester, "--gpumem-snapshot=snaps", "--gpumem-explain=none")
    result.assert_outcomes(passed=1, failed=1)
    written = sorted(p.name for p in (pytester.path / "snaps").iterdir())
    assert written == ["test_two.py_test_big.pickle"]
    snapshot = pickle.loads((pytester.path / "snaps" / written[0]).read_bytes())
    assert [(e["action"], e["size"]) for e in snapshot["device_traces"][0]][:1] == [("alloc", 2 * MiB)]
    assert tests["test_two.py::test_big"]["snapshot"].endswith("test_two.py_test_big.pickle")
    assert tests["test_two.py::test_small"]["snapshot"] == ""
    result.stdout.fnmatch_lines(["*snapshot*test_two.py_test_big.pickle (open it at https://pytorch.org/memory_viz)"])


def test_bad_explain_value_names_its_source(pytester):
    pytester.makepyfile(test_a="def test_a(): pass")
    result = pytester.runpytest("--gpumem-explain=some")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--gpumem-explain: unknown explain 'some'; choose one of failed, all, none*"])


def test_registering_a_model_does_not_keep_it_alive(pytester):
    """A test that frees a registered model gets its memory back: registration holds it weakly."""
    pytester.makepyfile(
        test_free="""
        import torch

        def test_free(gpumem):
            model = torch.nn.Linear(512, 512)  # 1 MiB of weights, 2 KiB of bias
            gpumem.register(model=model, batch=1)
            del model
            with gpumem.phase("after"):
                x = torch.ones(2**18)  # 1 MiB
            assert gpumem.peak(phase="after") == 2**20
        """
    )
    pytester.runpytest().assert_outcomes(passed=1)


def test_failing_training_step_gets_measured_levers(pytester):
    """A tiny QLoRA step over its budget: the advisor re-runs the step with each knob turned and
    recommends the cheapest-in-quality lever that fits; the model comes from a fixture, so it outlives
    the test body."""
    pytester.makepyfile(
        test_step="""
        import pytest

        @pytest.fixture
        def model(quantized_model, lora):
            return lora(quantized_model("llama", size="tiny", quant="nf4"), r=8, gradient_checkpointing=False)

        @pytest.mark.gpumem(budget="3 MiB")
        def test_step(model, train_step):
            train_step(model, batch=4, seq=64, steps=2)
        """
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    advice = tests["test_step.py::test_step"]["advice"]
    levers = {lever["key"]: lever for lever in advice["levers"]}
    for key in ("batch", "checkpointing", "seq"):
        assert levers[key]["source"] == "measured" and levers[key]["saving"] > 0
        assert levers[key]["estimated"] is not None
    assert levers["rank"]["source"] == "estimated"
    assert advice["recommended"] and advice["needed"] > 0
    chosen = [levers[key] for key in advice["recommended"]]
    assert sum(lever["saving"] for lever in chosen) >= advice["needed"]
    result.stdout.fnmatch_lines(["*lever*(measured)*", "*advice*enough*"])


def test_explain_none_estimates_without_running_again(pytester):
    pytester.makepyfile(
        test_step="""
        import pytest

        @pytest.fixture
        def model(quantized_model, lora):
            return lora(quantized_model("llama", size="tiny", quant="nf4"), r=8, gradient_checkpointing=False)

        @pytest.mark.gpumem(budget="3 MiB")
        def test_step(model, train_step):
            train_step(model, batch=4, seq=64, steps=2)

        @pytest.mark.gpumem
        def test_passing(model, train_step):
            train_step(model, batch=1, seq=16, steps=1)
        """
    )
    result, tests = run(pytester, "--gpumem-explain=none")
    result.assert_outcomes(failed=1, passed=1)
    levers = tests["test_step.py::test_step"]["advice"]["levers"]
    assert levers and all(lever["source"] == "estimated" for lever in levers)
    assert tests["test_step.py::test_passing"]["advice"] is None

    result, tests = run(pytester, "--gpumem-explain=all")
    assert tests["test_step.py::test_passing"]["advice"] is not None


def test_the_optimizer_knob_registers_as_a_knob_beside_the_other_knobs(pytester):
    """``optimizer="adamw"`` names the kind of optimizer the step makes: the optimizer lever applies to it."""
    pytester.makepyfile(
        test_own="""
        import pytest, torch

        @pytest.mark.gpumem(budget="1 MiB")
        def test_own(gpumem):
            model = torch.nn.Linear(256, 256)

            def step(batch=64, optimizer="adamw"):
                assert optimizer in ("adamw", "adamw8bit")
                opt = torch.optim.AdamW(model.parameters())
                model(torch.randn(batch, 256)).square().mean().backward()
                opt.step()

            gpumem.register(model=model, step=step, batch=64, optimizer="adamw")
            step()
        """
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    levers = {lever["key"]: lever for lever in tests["test_own.py::test_own"]["advice"]["levers"]}
    assert "8-bit AdamW" in levers["optimizer"]["action"]


def test_own_training_code_registers_its_knobs_and_gets_measured_levers(pytester):
    pytester.makepyfile(
        test_own="""
        import pytest, torch

        @pytest.fixture
        def model():
            return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))

        @pytest.mark.gpumem(budget="4 MiB")
        def test_own(model, gpumem):
            optimizer = torch.optim.AdamW(model.parameters())

            def step(batch=512, accumulation=1):
                for _ in range(accumulation):
                    model(torch.randn(batch, 256)).square().mean().backward()
                optimizer.step()
                optimizer.zero_grad()

            gpumem.register(model=model, optimizer=optimizer, step=step, batch=512, accumulation=1)
            step()
        """
    )
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    levers = {lever["key"]: lever for lever in tests["test_own.py::test_own"]["advice"]["levers"]}
    assert levers["batch"]["source"] == "measured" and levers["batch"]["saving"] > 0
    assert "batch 512 -> 256" in levers["batch"]["action"]


# -- a registered step that lacks a knob

OWN_STEP = """
import pytest, torch

@pytest.fixture
def model():
    return torch.nn.Sequential(torch.nn.Linear(256, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 256))

@pytest.mark.gpumem(budget="4 MiB")
def test_own(model, gpumem):
    optimizer = torch.optim.AdamW(model.parameters())

    def step({signature}):
        for _ in range(accumulation):
            model(torch.randn(batch, 256)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()

    gpumem.register(model=model, optimizer=optimizer, step=step, batch=512)
    step()
"""


def levers_of(tests: dict) -> dict[str, dict]:
    return {lever["key"]: lever for lever in tests["test_own.py::test_own"]["advice"]["levers"]}


def test_a_lever_the_step_cannot_turn_names_the_missing_knob(pytester):
    # The step takes neither `optimizer` nor `autocast`: those levers keep their estimates and say why.
    pytester.makepyfile(test_own=OWN_STEP.format(signature="batch=512, accumulation=1"))
    result, tests = run(pytester, "--gpumem-markdown=out.md")
    result.assert_outcomes(failed=1)
    levers = levers_of(tests)
    assert levers["optimizer"]["source"] == "estimated"
    assert levers["optimizer"]["basis"].startswith("not measured: the registered step takes no 'optimizer' argument;")
    assert levers["bf16"]["basis"].startswith("not measured: the registered step takes no 'autocast' argument;")
    result.stdout.fnmatch_lines(["*8-bit optimizer: *[[]not measured: the registered step takes no 'optimizer' arg*"])
    markdown = (pytester.path / "out.md").read_text()
    assert "not measured: the registered step takes no 'optimizer' argument" in markdown
    for text in (result.stdout.str(), markdown):
        assert "could not be measured" not in text and "ValueError" not in text


def test_a_step_without_accumulation_gets_its_batch_lever_measured_as_one_micro_batch(pytester):
    # The same step, with and without an `accumulation` argument: one micro-batch of 256, run with the
    # gradients of the micro-batch before it alive, peaks as the accumulated step does.
    pytester.makepyfile(test_own=OWN_STEP.format(signature="batch=512, accumulation=1"))
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    accumulated = levers_of(tests)["batch"]
    assert accumulated["basis"].startswith("re-ran the step with batch 256, accumulation 2: peak")

    pytester.makepyfile(test_own=OWN_STEP.format(signature="batch=512").replace("range(accumulation)", "range(1)"))
    result, tests = run(pytester)
    result.assert_outcomes(failed=1)
    batch = levers_of(tests)["batch"]
    assert batch["source"] == "measured"
    assert batch["basis"].startswith(
        "re-ran one micro-batch (batch 256, with the gradients of the micro-batches before it; "
        "the step takes no 'accumulation' argument): peak"
    )
    assert batch["saving"] == accumulated["saving"] > 0
    assert batch["basis"].split(": peak ")[1] == accumulated["basis"].split(": peak ")[1]
    result.stdout.fnmatch_lines(["*smaller batch + accumulation: *(measured) [[]re-ran one micro-batch (batch 256*"])
