"""Fixtures of the example suite."""

from __future__ import annotations

from pathlib import Path

import pytest
from finetune import make_checkpoint

CACHE_KEY = "gpumem-example-checkpoint"


def pytest_collection_finish(session: pytest.Session) -> None:
    """Make the checkpoint after collection, before the first test starts.

    pytest-gpumem measures a test's setup too, and the first setup of a
    session fixture happens inside the setup of the first test that uses it:
    generating the checkpoint there would be charged to that test on every
    run with a cold cache. (Under xdist each worker does this; they write the
    same bytes, each through its own staging directory.)
    """
    if session.items and not session.config.option.collectonly:
        make_checkpoint(session.config.cache.mkdir(CACHE_KEY))


@pytest.fixture(scope="session")
def checkpoint(request: pytest.FixtureRequest) -> Path:
    """A tiny random-weight Llama checkpoint on disk, made once and kept in pytest's cache.

    Normally already made by ``pytest_collection_finish``, so this only finds
    it; ``pytest --cache-clear`` makes it again, with the same seed and bytes.
    """
    return make_checkpoint(request.config.cache.mkdir(CACHE_KEY))
