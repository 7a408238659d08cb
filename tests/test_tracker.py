"""The cpu backend's meter against real tensors of known size, to the byte."""

from __future__ import annotations

import gc

import pytest
import torch

from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.measure.meters.tracker import TrackerMeter

MiB = 2**20


@pytest.fixture
def meter():
    meter = TrackerMeter()
    meter.begin()
    yield meter
    meter.end()


def allocated(peaks) -> int:
    return peaks["allocated"]["cpu"]


@pytest.mark.parametrize(
    ("make", "nbytes"),
    [
        (lambda: torch.empty(1000, dtype=torch.float32), 4000),
        (lambda: torch.zeros(10, 10, dtype=torch.float64), 800),
        (lambda: torch.ones(3, 5, dtype=torch.bfloat16), 30),
        (lambda: torch.randint(0, 9, (7,), dtype=torch.int64), 56),
        (lambda: torch.empty(0), 0),
        (lambda: torch.arange(MiB, dtype=torch.uint8), MiB),
    ],
)
def test_counts_a_fresh_tensor_exactly(meter, make, nbytes):
    tensor = make()
    assert allocated(meter.mark()) == nbytes
    del tensor


def test_views_inplace_and_shared_storage_cost_nothing(meter):
    base = torch.empty(1000, dtype=torch.float32)
    views = [base.view(10, 100), base[::2], base.t() if base.dim() == 2 else base.unsqueeze(0), base.detach()]
    base.add_(1).mul_(2)
    torch.add(base, 1, out=base)
    shared = torch.empty(0).set_(base.untyped_storage())
    assert allocated(meter.mark()) == 4000
    del views, shared


def test_a_storage_is_uncounted_only_when_its_last_view_dies(meter):
    base = torch.empty(MiB, dtype=torch.uint8)
    view = base[10:20]
    meter.mark()
    del base
    gc.collect()
    assert allocated(meter.mark()) == MiB  # the view keeps the storage alive
    del view
    gc.collect()
    other = torch.empty(100, dtype=torch.uint8)
    assert allocated(meter.mark()) == MiB  # the segment began while it was alive ...
    assert allocated(meter.mark()) == 100  # ... and the next one only sees what is left
    del other


def test_peak_of_transient_tensors(meter):
    kept = torch.empty(MiB, dtype=torch.uint8)
    for _ in range(3):
        transient = torch.empty(2 * MiB, dtype=torch.uint8)
        del transient
    assert allocated(meter.mark()) == 3 * MiB
    del kept


def test_ops_with_several_and_list_results(meter):
    values, indices = torch.tensor([3.0, 1.0, 2.0]).sort()  # values 12 + indices 24; the input dies
    parts = torch._foreach_add([torch.ones(4), torch.ones(8)], 1.0)  # inputs 16 + 32, results 16 + 32
    assert allocated(meter.mark()) == 12 + 24 + 48 + 48
    del values, indices, parts


def test_autograd_and_optimizer_state_are_seen():
    layer = torch.nn.Linear(64, 32)  # weights made before measuring: not counted
    meter = TrackerMeter()
    meter.begin()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    layer(torch.ones(1, 64)).sum().backward()
    optimizer.step()
    grads = sum(p.numel() * 4 for p in layer.parameters())
    after_step = allocated(meter.mark())
    meter.end()
    # gradients (one per parameter) and AdamW's two moments stay alive after the step
    assert after_step >= 3 * grads
    assert all(p.grad is not None for p in layer.parameters())


def test_measurement_assigns_segments_to_nested_phases():
    measurement = Measurement(TrackerMeter())
    with measurement.phase("setup"):
        kept = torch.empty(MiB, dtype=torch.uint8)
    with measurement.phase("call"):
        with measurement.phase("forward"):
            transient = torch.empty(2 * MiB, dtype=torch.uint8)
            del transient
        assert measurement.peak() == 3 * MiB
        with measurement.phase("step"):
            torch.empty(MiB // 2, dtype=torch.uint8)
    sample = measurement.finish()
    assert sample.value("allocated", "setup") == MiB
    assert sample.value("allocated", "forward") == 3 * MiB
    assert sample.value("allocated", "step") == MiB + MiB // 2
    assert sample.value("allocated", "call") == 3 * MiB
    assert list(sample.phases) == ["setup", "call", "forward", "step"]
    del kept


def test_nothing_is_counted_after_end():
    meter = TrackerMeter()
    meter.begin()
    meter.end()
    torch.empty(MiB)
    fresh = TrackerMeter()
    fresh.begin()
    assert allocated(fresh.mark()) == 0
    fresh.end()
