"""The packing scheduler's admission, driven the way pytest-xdist drives it, with simulated workers.

A simulated worker runs the first test of its queue only once a second is queued or it is shut down, as
pytest-xdist's workers do; the simulation completes running tests in random order and checks, at every
step, that what runs on a device fits its memory and that a test that must run alone does.
"""

from __future__ import annotations

import random

import pytest

from pytest_gpumem.xdist.packing import Demand, PackingScheduling

MiB = 2**20


class FakeNode:
    def __init__(self, name: str) -> None:
        self.name = name
        self.shutting_down = False
        self.queue: list[int] = []

    def send_runtest_some(self, indices: list[int]) -> None:
        assert not self.shutting_down, f"{self.name} got tests after its shutdown"
        self.queue.extend(indices)

    def shutdown(self) -> None:
        self.shutting_down = True

    def running(self) -> int | None:
        if len(self.queue) >= 2 or (self.queue and self.shutting_down):
            return self.queue[0]
        return None

    def __repr__(self) -> str:
        return self.name


def make(demands, devices=("0", "1"), workers=4, usable=100 * MiB, resident=10 * MiB):
    nodes = [FakeNode(f"gw{i}") for i in range(workers)]
    device_of = {node: devices[i % len(devices)] for i, node in enumerate(nodes)}
    ids = [f"t{i}" for i in range(len(demands))]
    table = dict(zip(ids, demands, strict=True))
    sched = PackingScheduling(
        workers, device_of.__getitem__, dict.fromkeys(devices, usable), table.__getitem__, resident
    )
    for node in nodes:
        sched.add_node(node)
    for node in nodes:
        sched.add_node_collection(node, ids)
    assert sched.collection_is_completed
    return sched, nodes, device_of


def run(sched, nodes, device_of, usable=100 * MiB, resident=10 * MiB, seed=0, ooms=(), steps=10_000):
    """Complete running tests one at a time, in random order, until the scheduler says all ran; return what
    ran (in order) and the largest number of tests seen running on one device at once."""
    rng = random.Random(seed)
    sched.schedule()
    ran: list[tuple[str, int, bool]] = []
    most = 0
    alive = list(nodes)
    for _ in range(steps):
        running = {node: node.running() for node in alive if node.running() is not None}
        by_device: dict[str, list[int]] = {}
        for node, index in running.items():
            by_device.setdefault(device_of[node], []).append(index)
        for device, indices in by_device.items():
            most = max(most, len(indices))
            alone = [i for i in indices if sched.demands[i].alone or i in sched.dispatched_alone]
            assert not alone or len(indices) == 1, f"{alone} must run alone on {device}, ran with {indices}"
            if alone:
                continue  # a test larger than the device runs alone, whatever it needs
            used = sum(resident + (sched.demands[i].need or 0) for i in indices)
            assert used <= usable, f"device {device} over its memory: {indices}"
        for node in [n for n in alive if n.shutting_down and not n.queue]:
            alive.remove(node)
            assert sched.remove_node(node) is None
        if sched.tests_finished:
            return ran, most
        if not running:
            if any(n for n in alive if n.shutting_down and not n.queue):
                continue
            pytest.fail(f"deadlock: nothing runs, pending {sched.pending}, queues {[n.queue for n in alive]}")
        node = rng.choice(list(running))
        index = node.queue.pop(0)
        nodeid = sched.collection[index]
        alone = sched.ran_alone(nodeid)
        ran.append((nodeid, index, alone))
        if index in ooms and not alone:
            assert sched.retry_alone(nodeid)
        sched.mark_test_complete(node, index)
    pytest.fail("the scheduler never finished")


def test_small_tests_share_a_device_and_all_run_once():
    demands = [Demand(need) for need in (30 * MiB, 20 * MiB, 20 * MiB, 10 * MiB, 5 * MiB, 5 * MiB) * 3]
    sched, nodes, device_of = make(demands)
    ran, most = run(sched, nodes, device_of)
    assert sorted(i for _, i, _ in ran) == list(range(len(demands)))
    assert most == 2  # two workers per device, and their tests fit together


def test_tests_are_taken_largest_first():
    demands = [Demand(5 * MiB), Demand(40 * MiB), Demand(None), Demand(20 * MiB)]
    sched, *_ = make(demands)
    sched.collection = next(iter(sched.node2collection.values()))
    sched.demands = demands
    assert sorted(range(4), key=sched._order) == [2, 1, 3, 0]


def test_tests_that_do_not_fit_together_run_one_at_a_time():
    demands = [Demand(60 * MiB) for _ in range(6)]  # 10 + 60 fits a device once, never twice
    sched, nodes, device_of = make(demands)
    ran, most = run(sched, nodes, device_of)
    assert len(ran) == 6 and most == 1


@pytest.mark.parametrize(
    "demand",
    [Demand(None), Demand(5 * MiB, alone=True, reason="exclusive"), Demand(95 * MiB)],
    ids=["no baseline", "exclusive", "larger than the device"],
)
def test_a_test_that_must_run_alone_runs_alone(demand):
    demands = [Demand(10 * MiB)] * 6 + [demand] + [Demand(10 * MiB)] * 6
    sched, nodes, device_of = make(demands)
    ran, _most = run(sched, nodes, device_of)
    assert [alone for nodeid, _, alone in ran if nodeid == "t6"] == [True]
    assert len(ran) == len(demands)


def test_a_suite_without_baselines_runs_one_test_per_device():
    sched, nodes, device_of = make([Demand(None)] * 8)
    ran, most = run(sched, nodes, device_of)
    assert len(ran) == 8 and most == 1
    assert all(alone for *_, alone in ran)


@pytest.mark.parametrize("seed", range(40))
def test_random_suites_always_finish_within_memory(seed):
    rng = random.Random(seed)
    demands = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.random()
        if kind < 0.1:
            demands.append(Demand(None))
        elif kind < 0.15:
            demands.append(Demand(rng.randint(1, 50) * MiB, alone=True))
        else:
            demands.append(Demand(rng.randint(0, 95) * MiB))
    ooms = {i for i in range(len(demands)) if rng.random() < 0.1}
    workers = rng.randint(1, 6)
    devices = ("0", "1", "2")[: rng.randint(1, 3)]
    resident = rng.randint(0, 60) * MiB  # up to more than a device holds, with three workers on it
    sched, nodes, device_of = make(demands, devices=devices, workers=workers, resident=resident)
    ran, _ = run(sched, nodes, device_of, seed=seed, ooms=ooms, resident=resident)
    first = {}
    for _nodeid, index, alone in ran:
        first.setdefault(index, alone)
    assert set(first) == set(range(len(demands)))
    retried = [i for i in range(len(demands)) if [x for _, x, _ in ran].count(i) == 2]
    assert set(retried) == {i for i in ooms if not first[i]}  # retried once, alone, unless it ran alone
    for index in retried:
        assert [alone for _, x, alone in ran if x == index] == [False, True]


def test_a_test_that_ran_out_of_memory_beside_others_runs_again_alone():
    demands = [Demand(30 * MiB)] * 4
    sched, nodes, device_of = make(demands, devices=("0",), workers=2)
    ran, _most = run(sched, nodes, device_of, ooms={1})
    assert [(index, alone) for _, index, alone in ran].count((1, True)) == 1
    assert not sched.retry_alone("t1")  # once only


def test_a_worker_that_crashes_gives_its_tests_back():
    demands = [Demand(10 * MiB)] * 6
    sched, nodes, device_of = make(demands, devices=("0",), workers=2)
    sched.schedule()
    victim = nodes[0]
    held = list(victim.queue)
    assert sched.remove_node(victim) == f"t{held[0]}"  # the test it was running crashed it
    ran, _ = run(sched, nodes[1:], device_of)
    assert sorted(i for _, i, _ in ran) == sorted(set(range(6)) - {held[0]})


def test_a_worker_is_charged_what_it_keeps_resident():
    demands = [Demand(30 * MiB)] * 4
    sched, nodes, device_of = make(demands, devices=("0",), workers=2)
    sched.set_resident(nodes[0], 60 * MiB)  # a session fixture holds a model there
    sched.set_resident(nodes[1], 60 * MiB)
    _ran, most = run(sched, nodes, device_of, resident=60 * MiB)
    assert most == 1


def test_workers_that_collected_different_tests_run_nothing_and_say_so():
    nodes = [FakeNode("gw0"), FakeNode("gw1")]
    seen = []
    sched = PackingScheduling(
        2, lambda n: "0", {"0": 100 * MiB}, lambda i: Demand(MiB), 0, mismatch=lambda *a: seen.append(a)
    )
    for node in nodes:
        sched.add_node(node)
    sched.add_node_collection(nodes[0], ["a", "b"])
    sched.add_node_collection(nodes[1], ["a", "c"])
    sched.schedule()
    assert [(a.name, b.name) for a, _, b, _ in seen] == [("gw0", "gw1")]
    assert not nodes[0].queue and not nodes[1].queue


def test_a_worker_started_in_place_of_a_dead_one_takes_a_free_group():
    from pytest_gpumem.xdist.pinning import group_for

    assert [group_for(w, 4, 2, []) for w in range(4)] == [0, 1, 0, 1]
    assert group_for(2, 2, 2, live=[0]) == 1  # gw1 (GPU 1) died; its replacement gw2 gets GPU 1, not GPU 0


def test_a_test_needs_what_its_ranks_take_on_one_device_together():
    from pytest_gpumem.core.sample import Baseline
    from pytest_gpumem.xdist.workers import need

    peaks = {"allocated": {"cuda:0": 10 * MiB, "rank0:cuda:0": 30 * MiB, "rank1:cuda:1": 35 * MiB}}
    assert need(Baseline(peaks, {"call": peaks}, software={}, recorded="", backend="cuda")) == 40 * MiB
