"""A user's own tests, written as people write them: their own loading, their own loop, nothing registered
with the plugin. Each ``test_<case>__as_is`` is a test as written; each other ``test_<case>__<lever>`` is it
with one lever pulled, run for real, so that ``benchmarks/unregistered.py`` can hold the advisor's numbers for
the as-is test against what each lever really saves. They need a CUDA GPU (a 1B and an 8B Llama-shaped
model with random weights, made once under ``GPUMEM_MODEL_DIR``)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

from pytest_gpumem.models.loading import ensure_checkpoint

MODELS = Path(os.environ.get("GPUMEM_MODEL_DIR", Path(tempfile.gettempdir()) / "gpumem-models"))


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU: a user's own tests of a 1B and an 8B model")
        for item in items:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llama_1b() -> Path:
    return ensure_checkpoint(MODELS, "llama", "1b")


@pytest.fixture(scope="session")
def llama_8b() -> Path:
    return ensure_checkpoint(MODELS, "llama", "8b")
