"""A pytest plugin for the benchmarks: the CPU and wall time of the test loop alone (``pytest_runtestloop``:
every test's setup, call and teardown), without the interpreter's start-up, imports and collection, which
a run pays once whatever it measures. Written as JSON to the file ``GPUMEM_LOOP_CLOCK`` names."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Generator
from pathlib import Path

import pytest

CLOCK_ENV = "GPUMEM_LOOP_CLOCK"


@pytest.hookimpl(wrapper=True)
def pytest_runtestloop(session: pytest.Session) -> Generator[None, object, object]:
    cpu, wall = time.process_time(), time.perf_counter()
    try:
        return (yield)
    finally:
        target = os.environ.get(CLOCK_ENV)
        if target:
            spent = {"cpu": time.process_time() - cpu, "wall": time.perf_counter() - wall}
            Path(target).write_text(json.dumps(spent), encoding="utf-8")
