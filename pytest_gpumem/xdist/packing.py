"""VRAM-aware packing: a pytest-xdist scheduler that lets workers share a GPU while their tests fit.

Each worker is pinned to one device (a group of GPUs, see :mod:`.pinning`);
several workers may share one. A test is sent to a worker only while the
device's **reservations** stay within its usable memory (its total less a
safety margin): every worker on the device reserves what it keeps resident
(its CUDA context and whatever its session holds, measured) plus the largest
need among the tests queued on it, a test's need being the peak its stored
baseline recorded above what was resident (the largest of its phases and
metrics). A test without a baseline, marked ``gpumem(exclusive=True)``, too
large to share the device, or retried after running out of memory beside
others runs **alone**: it is admitted only onto a device with nothing else
queued, and nothing joins it there.

pytest-xdist runs a worker's first queued test only once a second one is
queued (it must know the next test to tear fixtures down right) or the
worker is shut down, so a worker's queue is kept two deep and it reserves
the larger of the two. Tests are taken largest first (first-fit
decreasing), so a queued partner never needs more than the test before it:
a worker can always be given a partner, and pairing never deadlocks. When
only tests that must run alone are left and every worker of a device holds
one test it cannot start, all but one of those workers are shut down (they
run their last test and leave) so the device drains.

This module knows nothing of pytest: nodes are duck-typed like pytest-xdist's
``WorkerController`` (``send_runtest_some``, ``shutdown``, ``shutting_down``)
and the caller supplies each node's device, each device's usable memory and
each test's demand.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

Node = Any  # a pytest-xdist WorkerController, or anything with the same three members


@dataclass(frozen=True)
class Demand:
    """What a test asks of its device: ``need`` bytes above the worker's resident memory (None: unknown,
    no baseline), or the whole device (``alone``)."""

    need: int | None
    alone: bool = False
    reason: str = ""  # why it runs alone: "no baseline", "exclusive", "retried after out of memory", ...


class PackingScheduling:
    """A pytest-xdist scheduler (the protocol of ``xdist.scheduler.LoadScheduling``) that packs tests onto
    shared devices by their stored peaks.

    ``device_of(node)`` names the device a node is pinned to; ``usable[device]`` is the bytes packed tests may
    take there (total less margin); ``demand(nodeid)`` is a test's :class:`Demand`; ``resident`` is what a
    worker is assumed to keep resident until :meth:`set_resident` reports what it measured.
    """

    def __init__(
        self,
        numnodes: int,
        device_of: Callable[[Node], Hashable],
        usable: Mapping[Hashable, int],
        demand: Callable[[str], Demand],
        resident: int,
        log: Callable[..., None] | None = None,
        mismatch: Callable[[Node, list[str], Node, list[str]], None] | None = None,
    ) -> None:
        self.numnodes = numnodes
        self._device_of = device_of
        self._usable = dict(usable)
        self._demand = demand
        self._default_resident = resident
        self._log = log or (lambda *args: None)
        self._mismatch = mismatch or (lambda *args: None)  # reports workers that collected different tests
        self.node2collection: dict[Node, list[str]] = {}
        self.node2pending: dict[Node, list[int]] = {}
        self.collection: list[str] | None = None
        self.pending: list[int] = []  # in the order they are taken: alone first, then largest need first
        self.demands: list[Demand] = []
        self.resident: dict[Node, int] = {}
        self.retried: set[int] = set()  # tests queued again to run alone after running out of memory
        self.dispatched_alone: set[int] = set()  # tests sent to run alone on their device
        self.shared: set[int] = set()  # tests that ran while another worker ran one on their device

    # -- the scheduler protocol pytest-xdist drives

    @property
    def nodes(self) -> list[Node]:
        return list(self.node2pending)

    @property
    def collection_is_completed(self) -> bool:
        return len(self.node2collection) >= self.numnodes

    @property
    def tests_finished(self) -> bool:
        """Every test has run: nothing pending and every queue empty (not merely one deep, as in
        LoadScheduling: a test still running may be queued again to run alone)."""
        if not self.collection_is_completed or self.pending:
            return False
        return not any(self.node2pending.values())

    @property
    def has_pending(self) -> bool:
        return bool(self.pending) or any(self.node2pending.values())

    def add_node(self, node: Node) -> None:
        assert node not in self.node2pending
        self.node2pending[node] = []
        self.resident[node] = self._default_resident

    def add_node_collection(self, node: Node, collection: Sequence[str]) -> None:
        assert node in self.node2pending
        if self.collection is not None and list(collection) != self.collection:
            # A worker started in place of one that died collected other tests: it can run none of ours.
            self._mismatch(next(iter(self.node2collection)), self.collection, node, list(collection))
            node.shutdown()
            del self.node2pending[node]
            self.resident.pop(node, None)
            return
        self.node2collection[node] = list(collection)

    def schedule(self) -> None:
        assert self.collection_is_completed
        if self.collection is None:
            (first, collection), *others = self.node2collection.items()
            differ = [(node, other) for node, other in others if other != collection]
            for node, other in differ:
                self._mismatch(first, collection, node, other)
            if differ:
                return  # as pytest-xdist's own schedulers do: nothing runs, the collection errors say why
            self.collection = collection
            self.demands = [self._demand(nodeid) for nodeid in self.collection]
            self.pending = sorted(range(len(self.collection)), key=self._order)
        self._fill()

    def mark_test_complete(self, node: Node, item_index: int, duration: float = 0) -> None:
        self.node2pending[node].remove(item_index)
        self._fill()

    def mark_test_pending(self, item: str) -> None:
        assert self.collection is not None
        self.pending.insert(0, self.collection.index(item))
        self._fill()

    def remove_pending_tests_from_node(self, node: Node, indices: Sequence[int]) -> None:
        raise NotImplementedError("the packing scheduler never steals tests")

    def remove_node(self, node: Node) -> str | None:
        """A worker left (shut down, or crashed with tests still queued: those go back to pending)."""
        queue = self.node2pending.pop(node)
        self.resident.pop(node, None)
        crashed = None
        if queue:
            assert self.collection is not None
            crashed = self.collection[queue.pop(0)]
            self.pending[:0] = sorted(queue, key=self._order)
        self._fill()
        return crashed

    # -- what the plugin tells it

    def set_resident(self, node: Node, nbytes: int) -> None:
        """What a worker keeps resident between tests, as it measured it (its CUDA context, the session's
        fixtures)."""
        if node in self.resident:
            self.resident[node] = nbytes

    def retry_alone(self, nodeid: str) -> bool:
        """Queue a test that ran out of memory beside others once more, to run alone. False where it ran
        alone already (its failure is its own), was retried already, or no worker is left to run it."""
        assert self.collection is not None
        index = self.collection.index(nodeid)
        if index not in self.shared or index in self.retried:
            return False
        if not any(not n.shutting_down for n in self.node2pending):
            return False
        self.retried.add(index)
        self.shared.discard(index)  # from now on it tells of the run alone
        self.demands[index] = Demand(self.demands[index].need, alone=True, reason="retried after out of memory")
        self.pending.insert(0, index)
        return True  # sent once the worker that failed it reports the test complete

    def ran_alone(self, nodeid: str) -> bool:
        """Whether the test had its device to itself, as far as the queues tell."""
        return self.collection is not None and self.collection.index(nodeid) not in self.shared

    # -- admission

    def _order(self, index: int) -> tuple[int, int, int]:
        demand = self.demands[index]
        if demand.alone or demand.need is None:
            return (0, 0, index)
        return (1, -demand.need, index)

    def _alone(self, index: int, node: Node) -> bool:
        demand = self.demands[index]
        if demand.alone or demand.need is None:
            return True
        usable = self._usable[self._device_of(node)]
        return self.resident[node] + demand.need > usable  # too large to share the device at all

    def _reservation(self, node: Node, extra: int | None = None) -> int:
        queue = self.node2pending[node] + ([extra] if extra is not None else [])
        needs = [self.demands[i].need or 0 for i in queue]
        return self.resident[node] + max(needs, default=0)

    def _admissible(self, index: int, node: Node) -> bool:
        device = self._device_of(node)
        others = [n for n in self.node2pending if n is not node and self._device_of(n) == device]
        queue = self.node2pending[node]
        if any(self._alone(i, node) for i in queue):
            return True  # the device is this worker's alone already; what follows runs alone too
        if not any(self.node2pending[n] for n in others):
            if self._alone(index, node) or not queue:
                return True  # an idle device takes any one test, even where the workers' residents fill it
        elif self._alone(index, node):
            return False
        if any(self._alone(i, n) for n in others for i in self.node2pending[n]):
            return False
        if queue and (self.demands[index].need or 0) <= max(self.demands[i].need or 0 for i in queue):
            return True  # a partner no larger than what is queued reserves nothing more
        load = sum(self._reservation(n) for n in others)
        return load + self._reservation(node, index) <= self._usable[device]

    def _running(self, node: Node) -> bool:
        queue = self.node2pending[node]
        return len(queue) >= 2 or (bool(queue) and node.shutting_down)

    def _fill(self) -> None:
        """Give every worker tests until its queue is two deep, as far as the devices admit them; shut down
        the workers that are no longer needed; drain a device where only tests that must run alone are left."""
        if self.collection is None:
            return
        for node in self.nodes:
            while not node.shutting_down and len(self.node2pending[node]) < 2:
                index = next((i for i in self.pending if self._admissible(i, node)), None)
                if index is None:
                    break
                self._send(node, index)
        if not self.pending:
            self._wind_down()
        elif not any(self._running(n) for n in self.node2pending):
            self._drain()
        self._note_sharing()

    def _note_sharing(self) -> None:
        """Mark the tests running now beside another worker's test on the same device."""
        by_device: dict[Hashable, list[int]] = {}
        for node, queue in self.node2pending.items():
            if self._running(node):
                by_device.setdefault(self._device_of(node), []).append(queue[0])
        for running in by_device.values():
            if len(running) > 1:
                self.shared.update(running)

    def _send(self, node: Node, index: int) -> None:
        self.pending.remove(index)
        if self._alone(index, node):
            self.dispatched_alone.add(index)
        self.node2pending[node].append(index)
        node.send_runtest_some([index])

    def _wind_down(self) -> None:
        """Nothing is pending: let the workers run what they hold and leave, but keep one (an idle one if
        there is) while tests still run elsewhere, for a test there that runs out of memory and must be
        retried alone. Its own last test then starts once the others are done."""
        active = [n for n in self.node2pending if not n.shutting_down]
        if not active:
            return
        reserve = min(active, key=lambda n: len(self.node2pending[n]))
        elsewhere = any(self.node2pending[n] for n in self.node2pending if n is not reserve)
        shared = any(i in self.shared for i in self.node2pending[reserve])  # its own test may fail so too
        if not (elsewhere or shared):
            reserve = None  # nothing left that could need a retry
        for node in active:
            if node is not reserve:
                node.shutdown()

    def _drain(self) -> None:
        """Only tests that must run alone are pending, and no worker can start what it holds: on the device
        of the first such worker, shut down all its workers but one; their last tests run and they leave, and
        the one left takes the pending test as its next."""
        stalled = [n for n in self.node2pending if len(self.node2pending[n]) == 1 and not n.shutting_down]
        if not stalled:
            return
        device = self._device_of(stalled[0])
        keep = stalled[0]
        for node in self.node2pending:
            if node is not keep and self._device_of(node) == device and not node.shutting_down:
                self._log("draining device", device, ": shutting down", node)
                node.shutdown()
