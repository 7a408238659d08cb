"""A stand-in for the plugin when it is disabled (``-p no:gpumem``): the marker and a fixture
that measures nothing, so that the same suites run with and without the plugin."""

from __future__ import annotations

import contextlib

import pytest


class _Nothing:
    def phase(self, name: str) -> contextlib.nullcontext:
        return contextlib.nullcontext()

    def peak(self, metric: str = "allocated") -> int:
        return 0


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpumem: measured by pytest-gpumem when it is enabled")


@pytest.fixture
def gpumem() -> _Nothing:
    return _Nothing()
