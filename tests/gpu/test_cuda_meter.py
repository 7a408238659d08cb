"""The cuda backend against allocations of known size, on every visible device."""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU: the cuda backend reads the CUDA caching allocator"
)

MiB = 2**20


@pytest.fixture(scope="module")
def meter():
    from pytest_gpumem.measure.meters.cuda import CudaMeter

    return CudaMeter()


@pytest.mark.parametrize("device", range(torch.cuda.device_count() if torch.cuda.is_available() else 0))
def test_allocated_and_reserved_on_each_device_to_the_byte(meter, device):
    name = f"cuda:{device}"
    before = meter.begin()
    kept = torch.empty(64 * MiB, dtype=torch.uint8, device=name)
    transient = torch.empty(32 * MiB, dtype=torch.uint8, device=name)
    del transient
    peaks = meter.mark()
    assert peaks["allocated"][name] == 96 * MiB
    assert peaks["reserved"][name] >= 96 * MiB
    assert set(peaks["allocated"]) == set(peaks["reserved"]) == {name}  # only the device the phase used
    second = meter.mark()  # a new segment starts at the current level
    assert second["allocated"][name] == 64 * MiB
    if "device" in peaks:
        # NVML sees the reserved segments (and rounds to its page size)
        assert peaks["device"][name] >= 64 * MiB
    assert before["allocated"][name] >= 0
    del kept
    meter.end()


def test_a_phase_that_used_no_gpu_reads_zero_on_the_first(meter):
    meter.begin()
    torch.ones(1024)  # the CPU only
    peaks = meter.mark()
    meter.end()
    assert peaks["allocated"] == {"cuda:0": 0} and set(peaks["reserved"]) == {"cuda:0"}


def test_views_and_inplace_cost_nothing(meter):
    meter.begin()
    base = torch.empty(16 * MiB, dtype=torch.uint8, device="cuda:0")
    base.view(4, -1).add_(1)
    base[::2].zero_()
    assert meter.mark()["allocated"]["cuda:0"] == 16 * MiB
    del base
    meter.end()


def test_plugin_on_cuda_end_to_end(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.mark.gpumem(budget="128 MiB")
        def test_over():
            x = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")

        @pytest.mark.gpumem(budget="128 MiB", metric="device")
        def test_device_metric(gpumem):
            with gpumem.phase("alloc"):
                x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        """
    )
    result = pytester.runpytest_subprocess("--gpumem-backend=cuda", "--gpumem-json=out.json", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["gpumem: over budget (allocated peak, cuda backend, hardware *)", "*268435456 B*"])
    tests = {t["nodeid"]: t for t in json.loads((pytester.path / "out.json").read_text())["tests"]}
    over = tests["test_plugin_on_cuda_end_to_end.py::test_over"]
    assert over["sample"]["phases"]["call"]["allocated"]["cuda:0"] == 256 * MiB
    assert over["hardware"] != "cpu"
    device = tests["test_plugin_on_cuda_end_to_end.py::test_device_metric"]
    assert device["verdict"]["metric"] == "device"
    assert device["sample"]["phases"]["alloc"]["allocated"]["cuda:0"] == 64 * MiB
