"""Many GPUs on a real machine: workers pinned to their own GPUs, workers packed onto shared ones, a model
spread over two GPUs, and one process per GPU. Each runs an inner suite in a fresh pytest process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

GPUS = torch.cuda.device_count() if torch.cuda.is_available() else 0
pytestmark = pytest.mark.skipif(GPUS < 1, reason="needs a CUDA GPU")
two_gpus = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 CUDA GPUs; {GPUS} visible")
xdist = pytest.importorskip("xdist")
ROOT = Path(__file__).resolve().parent.parent.parent
MiB = 2**20
TESTS = max(4, 2 * GPUS)  # enough for every pinned worker to run some


def run(where: Path, *args: str, expect: int = 0, env: dict[str, str] | None = None) -> tuple[dict, str]:
    out = where / "out.json"
    out.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--gpumem-backend=cuda", f"--gpumem-json={out}",
         f"--gpumem-baselines={where / 'baselines'}", *args],
        cwd=where, capture_output=True, text=True, timeout=900, env={**os.environ, **(env or {})},
    )  # fmt: skip
    assert done.returncode == expect, done.stdout[-6000:] + done.stderr[-3000:]
    tests = {t["nodeid"]: t for t in json.loads(out.read_text())["tests"]} if out.exists() else {}
    return tests, done.stdout


def write(where: Path, name: str, source: str) -> None:
    (where / name).write_text(textwrap.dedent(source))


def test_each_pinned_worker_sees_its_own_gpu(tmp_path):
    """One worker per GPU, whatever their number: each sees exactly one, and no two see the same."""
    write(
        tmp_path,
        "test_inner_pinned.py",
        """
        import json, os, pathlib, time
        import pytest, torch

        @pytest.mark.gpumem
        @pytest.mark.parametrize("n", range(TESTS))
        def test_where(n, worker_id):
            torch.ones(2**20, device="cuda")
            seen = {"visible": os.environ["CUDA_VISIBLE_DEVICES"], "count": torch.cuda.device_count(),
                    "uuid": str(torch.cuda.get_device_properties(0).uuid)}
            pathlib.Path(f"{worker_id}-{n}.json").write_text(json.dumps(seen))
            time.sleep(1)
    """.replace("TESTS", str(TESTS)),
    )
    run(tmp_path, "-n", str(GPUS), "--gpumem-gpus-per-worker=1")
    seen = [json.loads(p.read_text()) for p in tmp_path.glob("gw*-*.json")]
    by_worker: dict[str, set[str]] = {}
    for path in tmp_path.glob("gw*-*.json"):
        by_worker.setdefault(path.name.split("-")[0], set()).add(json.loads(path.read_text())["uuid"])
    assert len(seen) == TESTS and all(s["count"] == 1 and s["visible"] for s in seen)
    assert len(by_worker) == GPUS and all(len(u) == 1 for u in by_worker.values())
    assert len(set.union(*by_worker.values())) == GPUS  # as many workers as GPUs, each on its own


def test_packed_workers_measure_what_a_serial_run_measures(tmp_path):
    """On whatever GPUs there are: the example suite serially (recording baselines), then packed with two
    workers per GPU; every test's allocated peak is the same, and `device` counts each worker's own use."""
    args = [str(ROOT / "examples"), "--model-sizes=tiny", f"--rootdir={ROOT}", "-c", str(ROOT / "pyproject.toml")]
    serial, _ = run(tmp_path, *args, "--gpumem-update-baselines")
    packed, out = run(tmp_path, *args, "-n", str(2 * GPUS), "--gpumem-pack")
    assert "packed by stored peaks" in out
    assert set(serial) == set(packed) and len(serial) >= 8
    for nodeid, test in serial.items():
        assert packed[nodeid]["sample"]["phases"]["call"]["allocated"] == test["sample"]["phases"]["call"]["allocated"]
        if "device" in packed[nodeid]["sample"]["before"]:  # NVML lists the worker's process: its own use
            own = max(packed[nodeid]["sample"]["before"]["device"].values())
            assert 100 * MiB < own < 8 * 2**30, (nodeid, own)  # a context and a model, not the whole device


@two_gpus
def test_a_model_spread_over_two_gpus_reports_both(tmp_path):
    write(
        tmp_path,
        "test_inner_device_map.py",
        """
        import pytest

        @pytest.mark.gpumem
        def test_qlora_over_two_gpus(quantized_model, lora, train_step):
            model = quantized_model("llama", size="1b", quant="nf4", device_map="auto")
            assert len(set(model.hf_device_map.values())) == 2, model.hf_device_map
            model = lora(model, r=16, gradient_checkpointing=True)
            train_step(model, batch=2, seq=512, steps=2)
    """,
    )
    tests, _ = run(tmp_path, "-n", "1", "--gpumem-gpus-per-worker=2")  # a worker of two GPUs, however many exist
    (test,) = tests.values()
    allocated = test["sample"]["phases"]["call"]["allocated"]
    assert set(allocated) == {"cuda:0", "cuda:1"}
    assert min(allocated.values()) > 100 * MiB, allocated  # both hold layers and their activations
    print(json.dumps(allocated))


RANKS = """
import os
import pytest, torch, torch.distributed as dist

SHARED = {shared}  # both ranks on GPU 0 (gloo between them), else rank R on GPU R (NCCL)

def work(rank, extra):
    device = 0 if SHARED else rank
    torch.cuda.set_device(device)
    dist.init_process_group("gloo" if SHARED else "nccl", rank=rank, world_size=2,
                            init_method="tcp://127.0.0.1:{port}")
    mib = (rank + 1) * 256 + (extra if rank == 1 else 0)
    x = torch.ones(mib * 2**20 // 4, device="cuda")
    dist.all_reduce(x[:1024].cpu() if SHARED else x)
    torch.cuda.synchronize()
    dist.destroy_process_group()

@pytest.mark.gpumem
def test_ddp(gpumem):
    gpumem.spawn(work, nprocs=2, args=(int(os.environ.get("EXTRA_MIB", "0")),))
"""


@pytest.mark.parametrize(
    "shared",
    [pytest.param(False, id="a-gpu-per-rank", marks=two_gpus), pytest.param(True, id="ranks-sharing-gpu0")],
)
def test_two_ranks_report_their_own_peaks_and_the_regressed_one_is_named(tmp_path, shared):
    (tmp_path / "test_inner_ranks_gpu.py").write_text(RANKS.format(shared=shared, port=29533 + shared))
    tests, _ = run(tmp_path, "--gpumem-update-baselines")
    (test,) = tests.values()
    allocated = test["sample"]["phases"]["call"]["allocated"]
    first, second = ("rank0:cuda:0", "rank1:cuda:0") if shared else ("rank0:cuda:0", "rank1:cuda:1")
    assert set(allocated) >= {first, second}, allocated
    assert allocated[first] >= 256 * MiB and allocated[second] >= 512 * MiB
    assert allocated[second] - allocated[first] == 256 * MiB  # each rank's own peak, exactly
    print(json.dumps(allocated))

    grown = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--gpumem-backend=cuda",
         f"--gpumem-baselines={tmp_path / 'baselines'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, "EXTRA_MIB": "128"},
    )  # fmt: skip
    assert grown.returncode == 1, grown.stdout[-4000:]
    assert second in grown.stdout and "regression" in grown.stdout, grown.stdout[-4000:]


def test_a_test_that_runs_out_of_memory_beside_another_is_retried_alone(tmp_path):
    """Two workers on one GPU, told it holds twice its memory: two tests of 55% each are admitted side by
    side, the second to allocate runs out of memory for real, and runs again alone, and passes."""
    write(
        tmp_path,
        "test_inner_crowded.py",
        """
        import time
        import pytest, torch

        @pytest.mark.gpumem
        @pytest.mark.parametrize("n", range(4))
        def test_half_and_more(n):
            total = torch.cuda.get_device_properties(0).total_memory
            x = torch.empty(int(total * 0.55), dtype=torch.uint8, device="cuda")
            time.sleep(3)
    """,
    )
    first = {"CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]}  # both on one GPU
    run(tmp_path, "--gpumem-update-baselines", env=first)
    total = torch.cuda.get_device_properties(0).total_memory
    tests, out = run(tmp_path, "-n", "2", "--gpumem-pack", f"--gpumem-pack-capacity={2 * total}", env=first)
    assert " rerun" in out and "4 passed" in out, out[-3000:]
    assert "retried alone" in out and "ran out of memory beside other tests" in out, out[-3000:]
    retried = [t for t in tests.values() if t.get("retried")]
    assert retried and all(t["retried"]["status"] == "oom" and t["verdict"]["status"] == "ok" for t in retried)
