"""Import the heavy libraries, and every module of the plugin, before any test runs.

The ``pytester`` fixture restores ``sys.modules`` when its test ends, dropping
whatever that test imported; torch registers operator libraries that cannot be
registered twice, so a module imported inside such a test and dropped would
fail when imported again. Imported here, they are part of every snapshot.
A module first imported inside an in-process run would also keep that whole
inner session alive through its assertion-rewriting loader, wherever something
that outlives the run refers to it (a plugin module stays an attribute of its
package; hypothesis registers its overloads with ``typing``): every tensor the
inner tests kept would then count against later tests' device limits.
"""

import contextlib
import importlib
import pkgutil

import pytest
import torch  # noqa: F401

import pytest_gpumem

with contextlib.suppress(ImportError):
    import hypothesis  # noqa: F401

for _module in pkgutil.walk_packages(pytest_gpumem.__path__, "pytest_gpumem."):
    if not _module.name.endswith("__main__"):  # which would run the command line
        with contextlib.suppress(ImportError):  # a module that needs an extra not installed here
            importlib.import_module(_module.name)

with contextlib.suppress(ImportError):
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM  # noqa: F401

    from pytest_gpumem.models import (
        training,  # noqa: F401
    )


@pytest.fixture(autouse=True)
def cpu_backend_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin's own tests run their inner pytest on the cpu backend, on a GPU machine too;
    the GPU tests ask for ``--gpumem-backend=cuda``, which the command line's precedence honours."""
    monkeypatch.setenv("GPUMEM_BACKEND", "cpu")
