"""The attribution on the cpu backend: real tensors of known size, split by consumer and located."""

from __future__ import annotations

import pickle

import pytest
import torch

from pytest_gpumem.config import backend
from pytest_gpumem.core.sample import Attribution
from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.measure.snapshot import from_records

HIDDEN, WIDE, BATCH = 256, 1024, 64


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(HIDDEN, WIDE, bias=False)
        self.down = torch.nn.Linear(WIDE, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(torch.nn.Module):
    def __init__(self, layers: int = 3) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block() for _ in range(layers))
        self.register_buffer("scale", torch.ones(HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x * self.scale


def param_bytes(model: torch.nn.Module) -> int:
    return sum(p.nbytes for p in model.parameters())


def train(measurement: Measurement, steps: int = 2) -> tuple[Attribution, dict, int]:
    """Two AdamW steps of a model made inside the measured call; returns the attribution, the call's peaks
    and the model's parameter bytes."""
    measurement.enter("call")
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.AdamW(model.parameters(), foreach=False)
    for step in range(1, steps + 1):
        with measurement.phase(f"step{step}"):
            x = torch.randn(BATCH, HIDDEN)
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad()
    size = param_bytes(model)
    measurement.exit("call")
    sample = measurement.finish()
    assert sample.attribution is not None
    return sample.attribution, sample.phases["call"], size


def test_consumers_match_tensors_of_known_size() -> None:
    attribution, call, size = train(Measurement(backend.create("cpu")))
    buffer = HIDDEN * 4
    peak = attribution.peak
    assert peak.weights == size + buffer
    # The peak is in an optimizer step (the first reaches it, the second repeats it): gradients and
    # both AdamW moments are alive.
    assert attribution.phase == "step1" and attribution.stage == "optimizer"
    assert peak.gradients == size
    assert peak.optimizer == 2 * size  # exp_avg and exp_avg_sq (the step counters are made by torch.tensor, unseen)
    assert peak.total == call["allocated"]["cpu"]


def test_stages_split_forward_backward_and_optimizer() -> None:
    attribution, _, size = train(Measurement(backend.create("cpu")))
    stages = attribution.stages
    assert set(stages) == {"forward", "backward", "optimizer"}
    # In forward no gradient exists yet (zero_grad set them to None), in the optimizer step all do.
    assert stages["forward"].gradients == 0
    assert stages["optimizer"].gradients == size
    # What the forward saves for backward is made inside the blocks: at least each layer's relu output,
    # which the down projection needs for its weight's gradient.
    saved = 3 * BATCH * WIDE * 4
    assert stages["forward"].layer_activations >= saved
    assert stages["forward"].layer_activations <= stages["forward"].activations


def test_peak_in_forward_names_the_module() -> None:
    measurement = Measurement(backend.create("cpu"))
    measurement.enter("call")
    model = Net(layers=1)
    with torch.no_grad():
        model(torch.randn(BATCH, HIDDEN))  # no grad: the peak is a temporary of the block
    measurement.exit("call")
    attribution = measurement.finish().attribution
    assert attribution is not None
    assert attribution.stage == "forward"
    assert attribution.module.startswith("layers.0")


def test_peak_in_backward_names_the_autograd_node() -> None:
    measurement = Measurement(backend.create("cpu"))
    measurement.enter("call")
    weight = torch.randn(HIDDEN, HIDDEN, requires_grad=True)
    x = torch.randn(4 * BATCH, HIDDEN)
    loss = (x @ weight).relu().sum()
    del x
    loss.backward()
    measurement.exit("call")
    attribution = measurement.finish().attribution
    assert attribution is not None
    assert attribution.stage == "backward"
    assert attribution.module.endswith("Backward0")


def test_window_is_the_call_phase() -> None:
    """What setup made and freed is not in the call's attribution; what it left alive is."""
    measurement = Measurement(backend.create("cpu"))
    measurement.enter("setup")
    kept = torch.ones(2**20, dtype=torch.uint8)
    transient = torch.ones(2**22, dtype=torch.uint8)
    del transient
    measurement.exit("setup")
    measurement.enter("call")
    extra = torch.ones(2**18, dtype=torch.uint8)
    measurement.exit("call")
    attribution = measurement.finish().attribution
    assert attribution is not None
    assert attribution.peak.activations == 2**20 + 2**18
    del kept, extra


def test_snapshot_of_records_opens_in_pytorchs_trace_reader() -> None:
    from torch.cuda import _memory_viz

    measurement = Measurement(backend.create("cpu"), snapshot=True)
    measurement.enter("call")
    a = torch.ones(1000, dtype=torch.uint8)
    b = torch.ones(3000, dtype=torch.uint8)
    del a
    measurement.exit("call")
    measurement.finish()
    snapshot = measurement.snapshot
    assert snapshot is not None
    events = snapshot["device_traces"][0]
    assert [(e["action"], e["size"]) for e in events] == [
        ("alloc", 1000),
        ("alloc", 3000),
        ("free_requested", 1000),
        ("free_completed", 1000),
    ]
    text = _memory_viz.trace(pickle.loads(pickle.dumps(snapshot)))
    assert "4 entries" in text
    del b


def test_snapshot_from_records_orders_events_by_time() -> None:
    records = [[10, "cpu", 1, 4, 3, False], [20, "cpu", 2, float("inf"), 0, False], [30, "cpu", 3, 5, 3, True]]
    events = from_records(records)["device_traces"][0]
    assert [(e["action"], e["size"]) for e in events] == [
        ("alloc", 10),
        ("alloc", 20),
        ("alloc", 30),
        ("free_requested", 10),
        ("free_completed", 10),
        ("free_requested", 30),
        ("free_completed", 30),
    ]
    assert events[2]["frames"][0]["name"] == "activations (in a decoder layer)"


@pytest.mark.parametrize("attribute", [True, False])
def test_meter_without_attribution_measures_the_same(attribute: bool) -> None:
    meter = backend.create("cpu", attribute=attribute)
    measurement = Measurement(meter)
    measurement.enter("call")
    x = torch.ones(2**16)
    measurement.exit("call")
    sample = measurement.finish()
    assert sample.phases["call"]["allocated"]["cpu"] == 2**18
    assert (sample.attribution is not None) is attribute
    del x
