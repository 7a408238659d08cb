"""Import the heavy libraries before any test runs.

The ``pytester`` fixture restores ``sys.modules`` when its test ends, dropping
whatever that test imported; torch registers operator libraries that cannot be
registered twice, so a module imported inside such a test and dropped would
fail when imported again. Imported here, they are part of every snapshot.
"""

import contextlib

import pytest
import torch  # noqa: F401

with contextlib.suppress(ImportError):
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM  # noqa: F401

    from pytest_gpumem import models, training  # noqa: F401


@pytest.fixture(autouse=True)
def cpu_backend_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's own tests run their inner pytest on the cpu backend, on a GPU machine too;
    the GPU tests ask for ``--gpumem-backend=cuda``, which the command line's precedence honours."""
    monkeypatch.setenv("GPUMEM_BACKEND", "cpu")
