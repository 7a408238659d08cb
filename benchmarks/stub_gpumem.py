"""A stand-in for the plugin when it is disabled (``-p no:gpumem``): the marker, a ``gpumem``
fixture that measures nothing, and the plugin's model fixtures unchanged, so that the same
suites run with and without the plugin."""

from __future__ import annotations

import contextlib
import gc
import os

import pytest

from pytest_gpumem.fixtures import gpumem_model_dir, lora, quantized_model, train_step  # noqa: F401


class _Nothing:
    def phase(self, name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def peak(self, metric: str = "allocated") -> int:
        return 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpumem: measured by pytest-gpumem when it is enabled")


def pytest_collection_finish(session: pytest.Session) -> None:
    # The plugin freezes the collector's view of what exists before the first
    # test (gc.freeze), which makes every later collection cheaper; with
    # GPUMEM_STUB_FREEZE=1 the stand-in does the same, so that a comparison
    # shows the plugin's own cost alone.
    if os.environ.get("GPUMEM_STUB_FREEZE") == "1":
        gc.collect()
        gc.freeze()


@pytest.fixture
def gpumem() -> _Nothing:
    return _Nothing()
