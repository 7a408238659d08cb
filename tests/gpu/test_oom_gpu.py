"""Out of memory on a real GPU: a 1B QLoRA step that fits under one --gpumem-device-limit and runs out of
memory under a smaller one, with the lever that makes it fit; and a clean state after an out-of-memory test.

The limits are not guessed: a first run measures the step without one, and the limits are set from its
peaks. ``GPUMEM_OOM_DRY_RUN=1`` runs the same logic on the cpu backend with a tiny model and small tensors
(what CI without a GPU can check of this file).
"""

from __future__ import annotations

import importlib.metadata
import json
import os

import pytest
import torch

from pytest_gpumem.models import loading

DRY = os.environ.get("GPUMEM_OOM_DRY_RUN") == "1"
BACKEND = "cpu" if DRY else "cuda"
DEVICE = "cpu" if DRY else "cuda:0"
UNIT = 2**10 if DRY else 2**20  # the proof suite's tensors: KiB on the dry run, MiB on the GPU
SIZE, BATCH, SEQ = ("tiny", 4, 64) if DRY else ("1b", 4, 1024)
GiB = 2**30

pytestmark = pytest.mark.skipif(
    not (DRY or torch.cuda.is_available()), reason="needs a CUDA GPU: device limits through the CUDA allocator"
)


def run(pytester: pytest.Pytester, name: str, *args: str) -> tuple[pytest.RunResult, dict]:
    """The inner suite on the measuring backend, in a process of its own (CUDA state must not leak)."""
    out = pytester.path / f"{name}.json"
    plugin = [] if any(e.name == "gpumem" for e in importlib.metadata.entry_points(group="pytest11")) else ["-p"]
    plugin += ["pytest_gpumem.plugin"] if plugin else []
    result = pytester.runpytest_subprocess(
        *plugin, f"--gpumem-backend={BACKEND}", f"--gpumem-json={out}", "-p", "no:cacheprovider", *args, timeout=400
    )
    print(f"===== {name} {' '.join(args)}: {result.parseoutcomes()}")
    assert out.exists(), result.stdout.str()[-3000:] + result.stderr.str()[-3000:]
    return result, {t["nodeid"].split("::")[-1]: t for t in json.loads(out.read_text())["tests"]}


def absolute(test: dict, metric: str) -> int:
    """What the test's call peak of ``metric`` took on the device, with what was resident before it."""
    before = test["sample"]["before"].get(metric, {}).get(DEVICE, 0)
    return before + test["sample"]["phases"]["call"][metric][DEVICE]


STEP = """
import os, pytest

PATH = os.environ["GPUMEM_OOM_CHECKPOINT"]
BATCH, SEQ = {batch}, {seq}

def train(quantized_model, lora, train_step, checkpointing):
    model = lora(quantized_model(path=PATH), r=16, gradient_checkpointing=checkpointing)
    train_step(model, batch=BATCH, seq=SEQ, steps=2)

@pytest.mark.gpumem{plain}
def test_plain(quantized_model, lora, train_step):
    train(quantized_model, lora, train_step, False)

@pytest.mark.gpumem{plain_small}
def test_plain_small(quantized_model, lora, train_step):
    train(quantized_model, lora, train_step, False)

@pytest.mark.gpumem{checkpointed}
def test_checkpointed(quantized_model, lora, train_step):
    train(quantized_model, lora, train_step, True)
"""


def test_a_qlora_step_fits_at_one_limit_and_names_the_lever_at_a_smaller_one(pytester, tmp_path_factory, monkeypatch):
    checkpoint = loading.ensure_checkpoint(tmp_path_factory.mktemp("models"), "llama", SIZE)
    monkeypatch.setenv("GPUMEM_OOM_CHECKPOINT", str(checkpoint))
    pytester.makepyfile(test_step=STEP.format(batch=BATCH, seq=SEQ, plain="", plain_small="", checkpointed=""))
    result, free = run(pytester, "unlimited", "-k", "not plain_small")
    result.assert_outcomes(passed=2)
    plain, checkpointed = free["test_plain"], free["test_checkpointed"]
    # Under the cap, the allocator's reserved bytes (the process's) may not pass the limit: above what the
    # plain step reserved, it fits; below what it allocated, it cannot. The checkpointed step must fit
    # where the plain one does not, so that checkpointing is a lever that makes it fit.
    fits = absolute(plain, "reserved") + (GiB if not DRY else 2**20)
    tight = (absolute(checkpointed, "reserved") + absolute(plain, "allocated")) // 2
    print(
        f"limits: fits {fits} B, tight {tight} B; plain {absolute(plain, 'allocated')} B allocated, "
        f"checkpointed {absolute(checkpointed, 'reserved')} B reserved"
    )
    assert absolute(checkpointed, "reserved") < tight < absolute(plain, "allocated")

    pytester.makepyfile(
        test_step=STEP.format(
            batch=BATCH,
            seq=SEQ,
            plain=f"(device_limit={fits})",
            plain_small=f'(device_limit={tight}, retry_on_oom="batch")',
            checkpointed=f"(device_limit={tight})",
        )
    )
    result, limited = run(pytester, "limited")
    result.assert_outcomes(passed=2, failed=1)
    assert limited["test_plain"]["status"] == "new"
    assert limited["test_checkpointed"]["status"] == "new"  # the lever applied fits under the tight limit

    failed = limited["test_plain_small"]
    failure = failed["verdict"]["oom"]
    assert failed["status"] == "oom" and failure["limit"] == tight and failure["device"] == DEVICE
    assert failure["requested"] > 0 and failure["needed"] > 0
    assert failure["attribution"] is not None and failure["attribution"]["peak"]["weights"] > 0
    # The whole step needs more than the failed request was short of; the advice must free all of it.
    advice = failed["advice"]
    assert failure["overshoot"] > failure["needed"] and advice["needed"] == failure["overshoot"]
    levers = {lever["key"]: lever for lever in advice["levers"]}
    assert levers["checkpointing"]["source"] == "measured"
    assert levers["checkpointing"]["saving"] >= advice["needed"]  # the lever that made it fit, by the numbers
    chosen = [levers[key] for key in advice["recommended"]]
    assert chosen and sum(lever["saving"] for lever in chosen) >= advice["needed"]
    lines = ["gpumem: out of memory*", "  request   *", "  short     *", "  over      *", "  lever     *(measured)"]
    result.stdout.fnmatch_lines([*lines, "  advice    *(enough)"])
    [fit] = failed["fits"]
    print("retry:", fit)
    assert fit["start"] == BATCH and not fit["note"]
    assert fit["value"] is None or fit["value"] < BATCH


PROOF = """
import pytest, torch

UNIT = {unit}
DEVICE = "{device}"
KEEP = []

@pytest.mark.gpumem(device_limit=2048 * UNIT)
def test_a_runs_out_of_memory():
    kept = torch.ones(1024 * UNIT, dtype=torch.uint8, device=DEVICE)
    more = torch.ones(2048 * UNIT, dtype=torch.uint8, device=DEVICE)

@pytest.mark.gpumem
def test_b_after(gpumem):
    x = torch.ones(512 * UNIT, dtype=torch.uint8, device=DEVICE)
    with gpumem.phase("sum"):
        y = x.float().sum()

@pytest.mark.gpumem
def test_c_leaks():
    KEEP.append(torch.ones(256 * UNIT, dtype=torch.uint8, device=DEVICE))

@pytest.mark.gpumem
def test_d_clean():
    torch.ones(256 * UNIT, dtype=torch.uint8, device=DEVICE)

@pytest.mark.gpumem
def test_e_no_cap_left():
    x = torch.ones(4096 * UNIT, dtype=torch.uint8, device=DEVICE)  # more than test_a's cap

def test_f_cleans_up():
    KEEP.clear()

@pytest.mark.gpumem(device_limit=1024 * UNIT)
def test_g_max_fit(gpumem):
    fit = gpumem.max_fit(lambda n: torch.empty(n * UNIT, dtype=torch.uint8, device=DEVICE), start=4096, knob="units")
    assert fit.value is not None and fit.value <= 1024
"""


def test_an_out_of_memory_test_leaves_a_clean_device_for_the_tests_after_it(pytester):
    pytester.makepyfile(test_proof=PROOF.format(unit=UNIT, device=DEVICE))
    alone, without = run(pytester, "without", "-k", "not test_a")
    alone.assert_outcomes(passed=6)
    result, tests = run(pytester, "with")
    result.assert_outcomes(passed=6, failed=1)

    failure = tests["test_a_runs_out_of_memory"]["verdict"]["oom"]
    print("oom:", {k: v for k, v in failure.items() if k != "attribution"})
    assert tests["test_a_runs_out_of_memory"]["status"] == "oom"
    assert failure["requested"] == 2048 * UNIT and failure["limit"] == 2048 * UNIT
    assert 1024 * UNIT <= failure["allocated"][DEVICE] < 1280 * UNIT  # and the warm-up's cuBLAS workspaces
    assert failure["needed"] == failure["requested"] - failure["free"] > 0
    assert failure["attribution"]["peak"]["activations"] >= 1024 * UNIT
    assert tests["test_a_runs_out_of_memory"]["leak"]["bytes"] == 0  # its frames were freed
    result.stdout.fnmatch_lines(["gpumem: out of memory*", f"  request   * ({2048 * UNIT} B) on {DEVICE}"])

    for name in ("test_b_after", "test_c_leaks", "test_d_clean", "test_e_no_cap_left", "test_g_max_fit"):
        after, before = tests[name], without[name]
        for metric in ("allocated", "reserved"):
            for phase, peaks in after["sample"]["phases"].items():
                assert peaks[metric] == before["sample"]["phases"][phase][metric], (name, phase, metric)
            assert after["sample"]["before"].get(metric) == before["sample"]["before"].get(metric), (name, metric)
        assert after["status"] == before["status"] and after["leak"] == before["leak"], name
    assert tests["test_c_leaks"]["leak"]["bytes"] == 256 * UNIT and tests["test_c_leaks"]["leak"]["enforced"] is False
    assert tests["test_d_clean"]["leak"]["bytes"] == 0
    [fit] = tests["test_g_max_fit"]["fits"]
    print("max_fit:", fit)
    assert fit["value"] == without["test_g_max_fit"]["fits"][0]["value"]
