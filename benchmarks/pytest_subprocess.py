"""How a benchmark starts pytest in a child process, with the plugin loaded whether or not it is installed.

Installed (``pip install -e .``), pytest loads the plugin by its entry point,
and naming it again with ``-p`` would register it twice, which is an error; on
a machine that runs the repository from ``PYTHONPATH`` (a GPU machine with its
own image) nothing loads it unless ``-p`` names it.
"""

from __future__ import annotations

import importlib.metadata
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def plugin_args() -> list[str]:
    """``-p pytest_gpumem.plugin`` where no installed distribution declares the plugin's entry point."""
    installed = any(entry.name == "gpumem" for entry in importlib.metadata.entry_points(group="pytest11"))
    return [] if installed else ["-p", "pytest_gpumem.plugin"]


def command(*args: str, plugin: bool = True) -> list[str]:
    """``python -m pytest`` with ``args``, the plugin loaded first unless ``plugin`` is False."""
    return [sys.executable, "-m", "pytest", *(plugin_args() if plugin else []), *args]


def environment(**extra: str) -> dict[str, str]:
    """This process's environment, with the repository and ``benchmarks/`` first on ``PYTHONPATH`` (this
    copy of the plugin, and the stand-in ``stub_gpumem``), and ``extra``."""
    path = [str(ROOT), str(ROOT / "benchmarks"), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), **extra}
