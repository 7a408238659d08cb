"""The garbage collector between tests: collect so a test is measured from a clean state, freeze what
outlives it so the next collections stay cheap.

A full collection before and after every test (to measure from a clean state, and to find what a test
left alive) scans every object the collector tracks. What outlives a test (pytest's reports, the plugin's
results, a suite's caches) accumulates, so at test 10,000 a full collection would scan what 9,999 tests
left: a suite's time would grow with the square of its tests. So what is alive between two measured tests
is frozen (``gc.freeze``: the permanent generation, which collections skip), right after a collection,
once the previous test is wholly done and before the next one's setup. Every later collection scans only
what was made since, and costs the same at test 10,000 as at test 10. (Keeping the plugin's own results
as data the collector does not track would not be enough: pytest keeps its reports of every test.)

What this does to the leak check and the clean state. A test's own objects are made after the freeze, so
its cyclic garbage is collected before what it left is measured, exactly as before; and freezing hides
no leak, since what a test left is found by its storages being alive (weak references), not by the
collector. Refcounting frees frozen objects as ever; only cyclic garbage made of objects that outlived an
earlier test stays, until a full collection (which unfreezes first). Such objects are mostly held by a
fixture of a wider scope: when one is finalized while a device holds memory, the plugin asks for a full
collection (:func:`collect_fully_next`), and it flags a leak only after one (:func:`collect_all`). The
rest (a suite that drops a cached model in a later test) waits for the next scheduled full collection,
which runs once the freezes since the last one are as many as those before it (and at least
``FULL_AFTER``): each object is scanned a bounded number of times on average, as under the interpreter's
own rule for its oldest generation. Everything is unfrozen when the run ends (:func:`thaw`).

One collection per test. The collection after a measured test's teardown also serves the freeze before the
next one, where nothing ran in between but pytest's reporting: no failure kept, no test the plugin does not
measure (:func:`other_test_runs`). Collecting again there would scan what the previous test left once more
(measured: about 50 ms after a first test that imported torch's compiler, 130 ms after the example suite's
first test), for garbage that pytest's reporting does not make.
"""

from __future__ import annotations

import gc
import sys

FULL_AFTER = 1000
_clean = False  # a collection ran after the last measured test (or as this one's setup began), nothing failed since
_full_due = False  # the next collection scans the frozen objects too
_freezes = 0  # freezes so far
_last_full = 0  # freezes before the last full collection
_FAILURE = ("last_type", "last_value", "last_traceback", "last_exc")


def _drop_failures() -> bool:
    """Drop what the interpreter keeps of the last failure (pytest sets it); True if it kept any."""
    failed = False
    for name in _FAILURE:
        if getattr(sys, name, None) is not None:
            failed = True
            setattr(sys, name, None)
    return failed


def _collect() -> None:
    global _full_due, _last_full
    if _full_due:
        gc.unfreeze()
        _full_due = False
        _last_full = _freezes
    gc.collect()


def release_failures() -> None:
    """Drop what pytest and the interpreter keep of the last failure, then collect the garbage.

    A failed test's traceback holds its frames and so its tensors; left alive,
    they would be charged to whatever is measured next. A collection also
    restarts the collector's counters, so that when cyclic garbage is freed
    during the test does not depend on the tests before it. Where a collection
    already ran since the last test (:func:`collect_after_teardown`,
    :func:`freeze_between_tests`) and nothing failed since, it is not repeated.
    Every meter's ``begin`` calls this, the what-if re-runs' inside a test
    included, so it never freezes.
    """
    global _clean
    if _drop_failures() or not _clean:
        _collect()
    _clean = False


def collect_after_teardown() -> None:
    """:func:`release_failures` after a test's teardown (to measure what it left alive); the next test's
    begin then need not collect again."""
    global _clean
    release_failures()
    _clean = True


def freeze_between_tests() -> None:
    """Drop the last failure, collect, then freeze what survived. Call it where no test is running (the plugin
    does as a measured test's setup starts), so that later collections skip what earlier tests left. The
    collection after the last measured test's teardown stands for this one where nothing ran since (see the
    module docstring) and no full collection is due."""
    global _clean, _freezes, _full_due
    if _drop_failures() or not _clean or _full_due:
        _collect()
    gc.freeze()
    _clean = True
    _freezes += 1
    if _freezes - _last_full >= max(FULL_AFTER, _last_full):
        _full_due = True


def other_test_runs() -> None:
    """A test that is not measured runs: what it leaves is collected before the next measured test."""
    global _clean
    _clean = False


def collect_fully_next() -> None:
    """Have the next collection scan the frozen objects too: some may have become cyclic garbage."""
    global _full_due
    _full_due = True


def collect_all() -> None:
    """A full collection now, frozen objects included (what survives is frozen again before the next test)."""
    global _clean
    _drop_failures()
    collect_fully_next()
    _collect()
    _clean = True


def thaw() -> None:
    """Unfreeze everything and start afresh: the run is over (another may follow in this process)."""
    global _clean, _full_due, _freezes, _last_full
    if _freezes:
        gc.unfreeze()
    _clean = _full_due = False
    _freezes = _last_full = 0
