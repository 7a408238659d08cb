"""What the run will write, checked before its first test.

Baselines, reports, exports and the history are written when the session
finishes. A path that cannot be written, or a library that is not installed,
would be found only then, after every test has run (on a GPU runner, the
whole job). What can be known beforehand is checked when pytest configures
the plugin, on the controller alone, and without creating or touching
anything: a directory that exists or can be made, and that is writable, an
output path that is not a directory, pandas (and pyarrow for ``.parquet``)
for the history. Each problem is a BadValue naming the path and the option it
came from.
"""

from __future__ import annotations

import os
from pathlib import Path

from pytest_gpumem.ci.history import HistoryError, require_libraries
from pytest_gpumem.config.settings import Settings
from pytest_gpumem.core.units import BadValue


def check(settings: Settings) -> None:
    """Raise BadValue for the first output of ``settings`` that cannot be written, naming where it was set."""
    source = settings.source
    if settings.update_baselines:
        given = source("baselines")
        problem = unwritable_directory(settings.baselines)
        if problem:
            raise BadValue(
                f"{source('update_baselines')}: cannot write baselines in {settings.baselines} ({given}): {problem}"
            )
    outputs = [(source("json"), settings.json), (source("markdown"), settings.markdown)]
    outputs += [(source("export"), export.path) for export in settings.export]
    outputs.append((source("history"), settings.history))
    for where, path in outputs:
        if path is not None:
            problem = unwritable_file(path)
            if problem:
                raise BadValue(f"{where}: cannot write {path}: {problem}")
    if settings.snapshot is not None:
        problem = unwritable_directory(settings.snapshot)
        if problem:
            raise BadValue(f"{source('snapshot')}: cannot write snapshots in {settings.snapshot}: {problem}")
    if settings.history is not None:
        try:
            require_libraries(settings.history)
        except HistoryError as exc:
            reason = str(exc).removeprefix(f"{settings.history}: ")
            raise BadValue(f"{source('history')}: cannot write {settings.history}: {reason}") from None


def unwritable_directory(path: Path) -> str | None:
    """Why files cannot be made in ``path`` (created first where missing); None where they can."""
    existing = next(p for p in (path, *path.parents) if p.exists())  # the root always exists
    if not existing.is_dir():
        return f"{existing} is a file, not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


def unwritable_file(path: Path) -> str | None:
    """Why ``path`` cannot be written whole (a temp file beside it, renamed over it); None where it can."""
    if path.is_dir():
        return f"{path} is a directory"
    return unwritable_directory(path.parent)
