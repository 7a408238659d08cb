"""A pytest plugin for the benchmarks: the CPU time of the test loop after its first test, written as JSON
to the file ``GPUMEM_LOOP_CLOCK`` names.

What a run pays once whatever it measures is left out: the interpreter's start-up, the imports, the
collection, and the first test, which pays torch's one-time warm-up (its first operators, the optimizer's
first step) on every side alike. What remains is what every further test costs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

CLOCK_ENV = "GPUMEM_LOOP_CLOCK"
_started: list[float] = []  # the CPU time when the first test had finished


def pytest_runtest_logfinish() -> None:
    if not _started:
        _started.append(time.process_time())


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get(CLOCK_ENV)
    if target and _started:
        tests = session.testscollected - 1
        spent = {"cpu": time.process_time() - _started[0], "tests": tests}
        Path(target).write_text(json.dumps(spent), encoding="utf-8")
