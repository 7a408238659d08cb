"""Which GPUs each pytest-xdist worker gets: pure functions fed given GPU lists, and the controller's
hook that pins a worker's process."""

from __future__ import annotations

import pytest

from pytest_gpumem.config.settings import resolve
from pytest_gpumem.core.store import BaselineStore
from pytest_gpumem.xdist import workers
from pytest_gpumem.xdist.pinning import PinningError, assign, groups, visible_devices, worker_index


@pytest.mark.parametrize(
    ("environ", "count", "expected"),
    [
        ({}, 4, ["0", "1", "2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": "2,3"}, 2, ["2", "3"]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-aa, GPU-bb"}, 2, ["GPU-aa", "GPU-bb"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, 0, []),
    ],
)
def test_the_controllers_gpus_are_named_as_cuda_visible_devices_names_them(environ, count, expected):
    assert visible_devices(environ, count) == expected


def test_groups_leave_gpus_over():
    assert groups(["0", "1", "2", "3", "4"], 2) == [["0", "1"], ["2", "3"]]


@pytest.mark.parametrize(
    ("per_worker", "workers", "shared", "expected"),
    [
        (1, 4, False, [["0"], ["1"], ["2"], ["3"]]),
        (2, 2, False, [["0", "1"], ["2", "3"]]),
        (1, 8, True, [["0"], ["1"], ["2"], ["3"]] * 2),  # packing: two workers per GPU
    ],
)
def test_each_worker_gets_its_group(per_worker, workers, shared, expected):
    gpus = ["0", "1", "2", "3"]
    assert [assign(gpus, per_worker, workers, w, shared) for w in range(workers)] == expected


def test_more_workers_than_gpus_is_an_error_that_says_what_fits():
    with pytest.raises(PinningError, match=r"with 3 workers needs 6 GPUs; 4 visible: use -n 2"):
        assign(["0", "1", "2", "3"], 2, 3, 0, shared=False)
    with pytest.raises(PinningError, match=r"only 1 GPU\(s\) visible \(0\)"):
        assign(["0"], 2, 1, 0, shared=True)


def test_worker_ids():
    assert worker_index("gw12") == 12
    with pytest.raises(PinningError, match="'foo'"):
        worker_index("foo")


def test_each_worker_process_gets_its_own_gpus_before_pytest_starts_there(pytester, monkeypatch, tmp_path):
    """The controller's hook on real pytest-xdist gateways (execnet subprocesses), two GPUs named by UUID:
    each worker's process has its own CUDA_VISIBLE_DEVICES before pytest is imported there."""
    execnet = pytest.importorskip("execnet")
    monkeypatch.setattr(workers, "resolve_backend", lambda backend: "cuda")  # a controller that sees two GPUs
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["GPU-aa", "GPU-bb"])
    config = pytester.parseconfig("--tx=2*popen", "--gpumem-gpus-per-worker=1", "--gpumem-backend=cuda")
    controller = workers.Controller(config, resolve(config), BaselineStore(tmp_path / "baselines"))
    seen = {}
    for worker in ("gw0", "gw1"):
        gateway = execnet.makegateway(f"popen//id={worker}")
        try:
            controller.pytest_xdist_newgateway(gateway)
            channel = gateway.remote_exec(
                "import os, sys\nchannel.send((os.environ.get('CUDA_VISIBLE_DEVICES'), 'pytest' in sys.modules))"
            )
            seen[worker] = channel.receive(30)
        finally:
            gateway.exit()
    controller.cleanup()
    assert seen == {"gw0": ("GPU-aa", False), "gw1": ("GPU-bb", False)}


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--gpumem-gpus-per-worker=1"], 4),
        (["--gpumem-gpus-per-worker=2"], 2),
        (["--gpumem-pack"], 8),  # two workers share each GPU
        (["--gpumem-pack", "--gpumem-gpus-per-worker=2"], 4),
        ([], None),  # pytest-xdist's own count
    ],
)
def test_n_auto_starts_workers_by_gpu_groups(pytester, monkeypatch, args, expected):
    monkeypatch.setattr(workers, "resolve_backend", lambda backend: "cuda")  # a machine with four GPUs
    monkeypatch.setattr(workers, "visible_gpus", lambda: ["0", "1", "2", "3"])
    assert workers.auto_workers(resolve(pytester.parseconfig(*args))) == expected
