"""Per-rank peaks of the processes a measured test starts: the rank files, and the ranks end to end
(``gpumem.spawn`` and torchrun, two gloo ranks on the CPU) with tensors of known size."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from pytest_gpumem.measure import ranks
from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.measure.meters.tracker import TrackerMeter
from pytest_gpumem.measure.ranks import RankFileError, collect, measure_rank

MiB = 2**20
SMALL = 1024 * 4  # the float32 tensor every rank all-reduces

# Rank r makes an (r + 1) MiB float32 tensor, then all-reduces a small one: its peak is both.
WORK = """
import torch, torch.distributed as dist

def work(rank, init="env://"):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    big = torch.ones((rank + 1) * 2**20 // 4)
    small = torch.ones(1024)
    dist.all_reduce(small)
    assert small[0].item() == 2 and big.numel()
    del big, small
    dist.destroy_process_group()
"""


def write_rank(directory: Path, rank: int, peaks: dict, pid: int = 1) -> None:
    directory.mkdir(exist_ok=True)  # as the first rank that writes does
    (directory / f"rank-{rank}-{pid}.json").write_text(json.dumps({"rank": rank, "world_size": 2, "peaks": peaks}))


def call_peaks(pytester: pytest.Pytester, *args: str) -> dict:
    result = pytester.runpytest_subprocess("--gpumem-json=out.json", "-p", "no:cacheprovider", *args)
    result.assert_outcomes(passed=1)
    (test,) = json.loads((pytester.path / "out.json").read_text())["tests"]
    return test["sample"]["phases"]


def assert_rank_peaks(phases: dict) -> None:
    for metric in ("allocated", "reserved"):
        peaks = phases["call"][metric]
        assert peaks["rank0:cpu"] == MiB + SMALL, peaks  # exact: the tracker counts storages to the byte
        assert peaks["rank1:cpu"] == 2 * MiB + SMALL, peaks
    assert not any(key.startswith("rank") for key in phases["setup"]["allocated"])  # they exited in call


def test_spawn_reports_each_rank(pytester):
    pytester.makepyfile(
        test_inner_ranks=WORK
        + """
def test_ranks(gpumem, tmp_path):
    gpumem.spawn(work, 2, args=(f"file://{tmp_path}/rendezvous",))
"""
    )
    assert_rank_peaks(call_peaks(pytester))


def test_torchrun_ranks_that_call_measure_rank_are_reported(pytester):
    pytester.makepyfile(
        train_ranks=WORK
        + """
import os
from pytest_gpumem.measure.ranks import measure_rank

if __name__ == "__main__":
    measure_rank()
    work(int(os.environ["RANK"]))
"""
    )
    pytester.makepyfile(
        test_inner_ranks="""
import subprocess, sys, pytest

@pytest.mark.gpumem()
def test_torchrun():
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "train_ranks.py"]
    subprocess.run(command, check=True)
"""
    )
    assert_rank_peaks(call_peaks(pytester))


def test_collect_keys_peaks_by_rank_and_reads_each_file_once(tmp_path):
    write_rank(tmp_path, 0, {"allocated": {"cuda:0": 5}})
    write_rank(tmp_path, 1, {"allocated": {"cuda:1": 7}, "device": {"cuda:1": 9}})
    (tmp_path / ".rank-half-written.tmp").write_text("{")  # a writer's temporary file is not a rank file
    seen: set[str] = set()
    assert collect(tmp_path, seen) == {
        "allocated": {"rank0:cuda:0": 5, "rank1:cuda:1": 7},
        "device": {"rank1:cuda:1": 9},
    }
    assert collect(tmp_path, seen) == {}
    write_rank(tmp_path, 0, {"allocated": {"cuda:0": 3}}, pid=2)  # rank 0 of a second run
    assert collect(tmp_path, seen) == {"allocated": {"rank0:cuda:0": 3}}
    assert collect(tmp_path)["allocated"]["rank0:cuda:0"] == 5  # without ``seen``: every file, the largest
    assert collect(tmp_path / "no rank wrote") == {}  # created by the first rank that writes


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("{not json", "cannot be read"),
        ('{"peaks": {}}', "no integer 'rank'"),
        ('{"rank": 0, "peaks": {"allocated": {"cpu": "1 MiB"}}}', "'peaks' is not"),
    ],
)
def test_a_corrupt_rank_file_is_an_error_naming_it(tmp_path, text, why):
    path = tmp_path / "rank-0-1.json"
    path.write_text(text)
    seen: set[str] = set()
    with pytest.raises(RankFileError, match=f"rank file {re.escape(str(path))}.*{why}") as error:
        collect(tmp_path, seen)
    assert "\n" not in str(error.value)
    assert collect(tmp_path, seen) == {}  # raised once, not at every later phase boundary


def test_without_the_environment_measure_rank_does_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(ranks.ENV, raising=False)
    modes = torch._C._len_torch_dispatch_stack()
    with measure_rank() as rank:
        assert torch._C._len_torch_dispatch_stack() == modes  # no tracker started
        torch.empty(MiB)
    assert rank.close() is None
    assert rank.directory is None


def test_a_rank_measured_as_a_block_writes_its_peaks(tmp_path, monkeypatch):
    monkeypatch.setenv(ranks.ENV, str(tmp_path))
    monkeypatch.setenv(ranks.BACKEND_ENV, "cpu")
    monkeypatch.setenv("RANK", "3")
    with measure_rank() as rank:
        assert measure_rank().directory is None  # a second call while measured is inert
        x = torch.empty(3 * MiB, dtype=torch.uint8)
        del x
    assert rank.path is not None and rank.path.parent == tmp_path
    data = json.loads(rank.path.read_text())
    assert (data["rank"], data["world_size"], data["pid"], data["backend"]) == (3, 1, os.getpid(), "cpu")
    assert collect(tmp_path) == {"allocated": {"rank3:cpu": 3 * MiB}, "reserved": {"rank3:cpu": 3 * MiB}}


def test_starting_to_measure_a_cuda_rank_starts_no_cuda(tmp_path, monkeypatch):
    """So a rank that pins itself after ``measure_rank()`` (CUDA_VISIBLE_DEVICES from LOCAL_RANK) still can."""

    def starts_cuda(*args: object) -> None:
        raise AssertionError("CUDA started by measure_rank")

    monkeypatch.setenv(ranks.ENV, str(tmp_path))
    monkeypatch.setenv(ranks.BACKEND_ENV, "cuda")
    for name in ("is_available", "device_count", "init"):
        monkeypatch.setattr(torch.cuda, name, starts_cuda)
    monkeypatch.setattr(torch.accelerator, "device_count", starts_cuda)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # a fresh rank (this process may have)
    with measure_rank() as rank:
        pass  # a rank that used no GPU
    assert rank.path is not None
    assert json.loads(rank.path.read_text())["peaks"] == {"allocated": {}, "reserved": {}}


def test_spawned_children_are_the_ranks_spawn_numbers_whatever_the_parent_was(monkeypatch):
    monkeypatch.setenv("RANK", "5")  # pytest itself started by a launcher
    monkeypatch.setenv("WORLD_SIZE", "8")
    monkeypatch.delenv(ranks.ENV, raising=False)
    seen = ranks._run_rank(1, lambda index: (index, os.environ["RANK"], os.environ["WORLD_SIZE"]), 2, ())
    assert seen == (1, "1", "2")


def test_measurement_merges_rank_files_into_the_open_phase_and_cleans_up(monkeypatch):
    monkeypatch.setenv(ranks.ENV, "outer")
    monkeypatch.delenv(ranks.BACKEND_ENV, raising=False)
    measurement = Measurement(TrackerMeter(attribute=False))
    path = Path(os.environ[ranks.ENV])  # the measurement's own directory, announced to child processes
    assert path.parent.is_dir() and not path.exists() and os.environ[ranks.BACKEND_ENV] == "cpu"
    assert measure_rank().directory is None  # the test's own process is not a rank
    with measurement.phase("setup"):
        pass
    with measurement.phase("call"):
        write_rank(path, 1, {"allocated": {"cpu": 4 * MiB}})
    sample = measurement.finish()
    assert sample.phases["call"]["allocated"]["rank1:cpu"] == 4 * MiB  # absolute: not relative to ``before``
    assert "rank1:cpu" not in sample.phases["setup"]["allocated"]
    assert sample.value("allocated") == 4 * MiB
    assert os.environ[ranks.ENV] == "outer" and ranks.BACKEND_ENV not in os.environ
    assert not path.exists()


@pytest.mark.parametrize("nprocs", [0, True, "2"])
def test_spawn_refuses_a_bad_number_of_processes(nprocs):
    from pytest_gpumem.fixtures import GpuMem

    with pytest.raises(ValueError, match=f"gpumem.spawn: nprocs must be a positive int, got {re.escape(repr(nprocs))}"):
        GpuMem(None).spawn(print, nprocs)  # type: ignore[arg-type]
