"""pytest-xdist: workers measure, the controller alone writes, and the result equals a serial run."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("xdist")

SUITE = """
import pytest, torch

@pytest.mark.gpumem
@pytest.mark.parametrize("kib", [64, 128, 256, 512, 1024, 2048])
def test_alloc(kib):
    x = torch.empty(kib * 1024, dtype=torch.uint8)
    y = x.float()  # 4 bytes an element, transient
    del y

@pytest.mark.gpumem(budget="1 KiB")
def test_over_budget():
    torch.empty(4096, dtype=torch.uint8)
"""


def entries(path):
    doc = json.loads(path.read_text())
    for entry in doc["tests"].values():
        entry.pop("recorded")
    return doc


def test_two_workers_write_the_same_baselines_as_a_serial_run(pytester):
    pytester.makepyfile(test_mem=SUITE)
    serial = pytester.runpytest_subprocess("--gpumem-update-baselines", "-p", "no:cacheprovider")
    serial.assert_outcomes(passed=6, failed=1)
    path = pytester.path / "baselines" / "cpu.json"
    expected = entries(path)
    assert len(expected["tests"]) == 6
    assert expected["tests"]["test_mem.py::test_alloc[64]"]["metrics"]["allocated"] == {"cpu": 5 * 64 * 1024}
    path.unlink()

    parallel = pytester.runpytest_subprocess("-n", "2", "--gpumem-update-baselines", "-p", "no:cacheprovider")
    parallel.assert_outcomes(passed=6, failed=1)
    parallel.stdout.fnmatch_lines(["*= gpumem =*", "*test_over_budget*over budget*", "baselines: *cpu.json: 6 added*"])
    assert entries(path) == expected

    # and compared against them, both ways
    pytester.runpytest_subprocess("-n", "2", "-p", "no:cacheprovider").assert_outcomes(passed=6, failed=1)
