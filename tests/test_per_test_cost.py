"""Load: the plugin's cost per test does not grow with the tests already run.

What grew was the garbage collection around every test, which scanned every
object left by the tests before. The collector now skips what outlived earlier
tests (it is frozen between tests), so these tests count the objects a
collection scans (deterministic, unlike a time) and check that what freezing
could hide is still freed where it matters: a wider fixture's cyclic garbage,
a test's tensor held only by an earlier test's garbage, and the rest on
schedule. How long a suite of thousands of tests takes is
``benchmarks/many_tests.py``'s job.
"""

from __future__ import annotations

import gc
import json
import weakref

import pytest

from pytest_gpumem.measure import collector

TRIVIAL = """
import pytest, torch

@pytest.mark.parametrize("i", range({tests}))
def test_small(i):
    x = torch.ones(64, 64)
    (x @ x).relu_().sum().item()
"""

# What the next collection would scan, as each test ends: the objects the collector tracks and has not frozen.
COUNT_TRACKED = """
import gc, json

TRACKED = []

def pytest_runtest_logfinish(nodeid, location):
    TRACKED.append(len(gc.get_objects()))

def pytest_sessionfinish(session):
    with open("tracked.json", "w") as out:
        json.dump(TRACKED, out)
"""


def test_what_a_collection_scans_does_not_grow_with_the_tests_run(pytester):
    tests = 150
    pytester.makepyfile(test_trivial=TRIVIAL.format(tests=tests))
    pytester.makeconftest(COUNT_TRACKED)
    result = pytester.runpytest("--gpumem-all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=tests)
    tracked = json.loads((pytester.path / "tracked.json").read_text())
    assert len(tracked) == tests
    # After the first tests (imports, the first collection), test 150 leaves the collector no more to scan
    # than test 50 did. Before, every test added what it left (pytest's reports, the plugin's results).
    early, late = max(tracked[40:50]), max(tracked[140:150])
    assert late <= early + 50, (early, late)
    assert late < 1_000, late  # and that is what one test made, not the whole run


# -- what freezing could hide is still freed

HOLDER = """
import pytest, torch

class Holder:
    '''Cyclic: only the garbage collector frees it, never refcounting.'''

    def __init__(self, nbytes):
        self.me = self
        self.tensor = torch.ones(nbytes, dtype=torch.uint8)
"""


def run(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest("--gpumem-json=out.json", "-p", "no:cacheprovider", *args)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"]: t for t in doc["tests"]}


def test_a_wider_fixtures_cyclic_garbage_is_freed_when_its_scope_ends(pytester):
    # The module fixture outlives its first test, so it is frozen; finalized, it is cyclic garbage that
    # only a full collection frees. The next module's test fits under its limit only once it is freed.
    pytester.makepyfile(
        test_a=HOLDER
        + """
@pytest.fixture(scope="module")
def held():
    return Holder(6 * 2**20)

@pytest.mark.gpumem(leak=False)
@pytest.mark.parametrize("i", range(3))
def test_uses_it(held, i):
    pass
""",
        test_b="""
import pytest, torch

@pytest.mark.gpumem(device_limit="8 MiB")
def test_fits_once_it_is_freed():
    torch.ones(6 * 2**20, dtype=torch.uint8)
""",
    )
    result, tests = run(pytester)
    result.assert_outcomes(passed=4)
    assert tests["test_b.py::test_fits_once_it_is_freed"]["status"] == "new"


def test_a_tensor_held_only_by_an_earlier_tests_garbage_is_no_leak(pytester):
    # The box outlives the test that made it, so it is frozen; the next test puts its tensor in it and drops
    # the box, which is now cyclic garbage that the collection after a test no longer scans. The leak check
    # collects fully before it blames a test.
    pytester.makepyfile(
        test_box=HOLDER
        + """
BOX = []

@pytest.mark.gpumem
def test_makes_the_box():
    BOX.append(Holder(0))

@pytest.mark.gpumem
def test_fills_and_drops_it():
    box = BOX.pop()
    box.tensor = torch.ones(2 * 2**20, dtype=torch.uint8)
    del box
"""
    )
    result, tests = run(pytester)
    result.assert_outcomes(passed=2)
    assert tests["test_box.py::test_fills_and_drops_it"]["leak"]["bytes"] == 0
    assert "leak:" not in result.stdout.str()


COUNT_BETWEEN = """
import gc, json

BETWEEN = []  # full collections from the end of each test (its teardown's included) to the next one's body
_counting = []

def _count(phase, info):
    if phase == "start" and info["generation"] == 2 and _counting:
        BETWEEN[-1] += 1

def pytest_configure(config):
    gc.callbacks.append(_count)

def pytest_runtest_logfinish(nodeid, location):
    BETWEEN.append(0)
    _counting[:] = [1]

def pytest_runtest_call(item):
    _counting.clear()

def pytest_sessionfinish(session):
    gc.callbacks.remove(_count)
    with open("between.json", "w") as out:
        json.dump(BETWEEN, out)
"""


def test_one_collection_between_two_measured_tests(pytester):
    # The collection after a test's teardown (for its leak check) also serves the freeze before the next one,
    # which then need not collect again.
    pytester.makepyfile(test_trivial=TRIVIAL.format(tests=5))
    pytester.makeconftest(COUNT_BETWEEN)
    result = pytester.runpytest("--gpumem-all", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=5)
    between = json.loads((pytester.path / "between.json").read_text())
    assert between[:-1] == [0, 0, 0, 0], between


def test_what_a_test_that_is_not_measured_leaves_is_collected_before_the_next_measured_one(pytester):
    pytester.makepyfile(
        test_between=HOLDER
        + """
import weakref

LEFT = []

@pytest.mark.gpumem
def test_a_measured():
    pass

def test_b_not_measured():
    LEFT.append(weakref.ref(Holder(2**20)))  # cyclic garbage once the test returns

@pytest.mark.gpumem
def test_c_measured():
    assert LEFT[0]() is None  # collected before this test was measured, not frozen
"""
    )
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


class Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def thawed():
    yield
    collector.thaw()


def test_frozen_garbage_is_collected_on_a_doubling_schedule(monkeypatch, thawed):
    monkeypatch.setattr(collector, "FULL_AFTER", 4)
    collector.thaw()
    freezes = 0
    fulls = []
    for _ in range(4):
        cycle = Cycle()
        gone = weakref.ref(cycle)
        collector.freeze_between_tests()  # it outlived a test: frozen
        freezes += 1
        del cycle
        gc.collect()
        assert gone() is not None  # the collector no longer sees it
        while gone() is not None:
            collector.freeze_between_tests()
            freezes += 1
            assert freezes < 100
        fulls.append(freezes)
    # The first full collection once FULL_AFTER freezes have passed, the next ones once the freezes since the
    # last are as many as those before it.
    assert fulls == [5, 9, 17, 33]


SCOPES = """
import pytest, torch

@pytest.fixture(scope="module")
def {name}():
    return {value}

@pytest.mark.gpumem(leak=False)
def test_uses_it({name}):
    pass
"""


def test_a_full_collection_is_asked_for_a_wider_scope_only_where_a_device_holds_memory(pytester):
    pytester.makeconftest(
        """
from pytest_gpumem.measure import collector

FULL = []

ASK = collector.collect_fully_next

def pytest_configure(config):
    collector.collect_fully_next = lambda: (FULL.append(1), ASK())

def pytest_unconfigure(config):
    collector.collect_fully_next = ASK
"""
    )
    pytester.makepyfile(
        test_1_nothing=SCOPES.format(name="nothing", value="None"),
        test_2_tensor=SCOPES.format(name="tensor", value="torch.ones(2**20, dtype=torch.uint8)"),
        test_3_counts="""
import conftest

def test_counts():
    assert conftest.FULL == [1]  # for the tensor's module, while the tensor was alive; not for None's
""",
    )
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)
