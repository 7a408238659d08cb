"""The attribution on a real GPU: its consumers add up to the CUDA allocator's own peak."""

from __future__ import annotations

import pickle

import pytest
import torch

from pytest_gpumem.config import backend
from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.models import loading, training

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: compares the attribution with the CUDA allocator"
)


@pytest.fixture(scope="module")
def meter():
    return backend.create("cuda")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {size: loading.ensure_checkpoint(root, "llama", size) for size in ("tiny", "1b")}


@pytest.mark.parametrize(
    ("size", "quant", "batch", "seq", "checkpointing"),
    [
        ("tiny", "nf4", 2, 64, True),
        ("1b", "nf4", 2, 512, True),
        ("1b", "nf4", 2, 512, False),
        ("1b", "bf16", 1, 512, True),
    ],
)
def test_consumers_add_up_to_the_allocator_peak(meter, checkpoints, size, quant, batch, seq, checkpointing):
    measurement = Measurement(meter)
    measurement.enter("call")
    with measurement.stage("load"):
        model = loading.load(checkpoints[size], quant, True, "bfloat16", {"": 0})
    model = loading.add_lora(model, r=16, gradient_checkpointing=checkpointing)
    params = sum(p.nbytes for p in model.parameters())
    training.train_steps(model, batch=batch, seq=seq, steps=2, phase=measurement.phase)
    measurement.exit("call")
    sample = measurement.finish()
    attribution = sample.attribution
    peak = sample.phases["call"]["allocated"]["cuda:0"]
    assert attribution is not None and attribution.device == "cuda:0"
    total = attribution.peak.total
    print(f"{size} {quant} b{batch}x{seq} gc={checkpointing}: allocator {peak}, attributed {total}, {attribution}")
    assert abs(total - peak) <= 0.02 * peak
    # The weights are the model's parameters (rounded to the allocator's blocks) plus quantization statistics.
    assert params <= attribution.peak.weights <= 1.1 * params + 2**20
    assert attribution.phase in ("step1", "step2")
    assert attribution.stage in ("forward", "backward", "optimizer")
    del model


def test_snapshot_holds_the_tests_own_history(meter):
    first = Measurement(meter, snapshot=True)
    first.enter("call")
    a = torch.empty(2**20, dtype=torch.uint8, device="cuda")
    del a
    first.exit("call")
    first.finish()
    second = Measurement(meter, snapshot=True)
    second.enter("call")
    b = torch.empty(3 * 2**20, dtype=torch.uint8, device="cuda")
    del b
    second.exit("call")
    second.finish()
    snapshot = second.snapshot
    assert snapshot is not None
    allocs = [e["size"] for e in snapshot["device_traces"][0] if e["action"] == "alloc"]
    assert 3 * 2**20 in allocs and 2**20 not in allocs
    pickle.dumps(snapshot)
