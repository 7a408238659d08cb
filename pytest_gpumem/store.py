"""Baselines on disk: ``baselines/<hardware key>.json``, reviewed in git.

Each file holds one hardware key's entries, keyed by test node id and dumped
deterministically (sorted keys, two-space indent, trailing newline) so that a
pull request's baseline diff reads like a table. Writes are atomic (a temp
file in the same directory, then a rename) and serialized by a lock file, and
each write re-reads the file under the lock, so concurrent runs merge instead
of clobbering each other. A file that cannot be read stops the run; only an
explicit update replaces it, and then it is kept beside as ``.bak``.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .sample import Baseline

SCHEMA = "pytest-gpumem/baselines/v1"


class BaselineError(Exception):
    """A baseline directory or file that cannot be used; the message names it."""


@dataclass
class UpdateSummary:
    """What an update wrote: for the terminal, so that nothing is replaced silently."""

    path: Path
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    backup: Path | None = None


def file_name(hardware: str) -> str:
    """The file of a hardware key (``estimate:H100`` -> ``estimate-H100.json``)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", hardware) + ".json"


def dumps(hardware: str, tests: dict[str, Baseline]) -> str:
    doc = {"schema": SCHEMA, "hardware": hardware, "tests": {k: v.to_dict() for k, v in tests.items()}}
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def parse(path: Path, text: str) -> tuple[str, dict[str, Baseline]]:
    """The hardware key and entries of a baseline file's text; BaselineError names what is wrong."""
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BaselineError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        found = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise BaselineError(f"{path}: not a pytest-gpumem baseline file (schema {found!r}, expected {SCHEMA!r})")
    hardware, tests = doc.get("hardware"), doc.get("tests")
    if not isinstance(hardware, str) or not isinstance(tests, dict):
        raise BaselineError(f"{path}: malformed baseline file: needs a 'hardware' string and a 'tests' object")
    entries = {}
    for nodeid, entry in tests.items():
        try:
            entries[nodeid] = Baseline.from_dict(entry)
            _check_peaks(entries[nodeid].metrics)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BaselineError(f"{path}: malformed entry for {nodeid!r}: {exc}") from None
    return hardware, entries


def _check_peaks(peaks: Any) -> None:
    for metric, per_device in peaks.items():
        for device, value in per_device.items():
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{metric} on {device} is {value!r}, not an int of bytes")


class BaselineStore:
    """All baseline files of one directory, loaded once per run."""

    def __init__(self, directory: Path, *, tolerate_unreadable: bool = False) -> None:
        """Load every ``*.json`` of ``directory`` (which need not exist yet).

        An unreadable file raises BaselineError, unless ``tolerate_unreadable``
        (an explicit update run): then it is remembered and reported as replaced.
        """
        self.directory = directory
        self.by_hardware: dict[str, dict[str, Baseline]] = {}
        self.unreadable: dict[Path, str] = {}
        if directory.exists() and not directory.is_dir():
            raise BaselineError(f"{directory}: the baseline directory is a file, not a directory")
        if not directory.exists():
            return
        for path in sorted(directory.glob("*.json")):
            try:
                hardware, entries = parse(path, _read(path))
            except BaselineError as exc:
                if not tolerate_unreadable:
                    raise
                self.unreadable[path] = str(exc)
                continue
            self.by_hardware[hardware] = entries

    def lookup(self, hardware: str, nodeid: str) -> Baseline | None:
        return self.by_hardware.get(hardware, {}).get(nodeid)

    def hardware_with(self, nodeid: str) -> list[str]:
        """The hardware keys that hold a baseline for ``nodeid``."""
        return sorted(hw for hw, entries in self.by_hardware.items() if nodeid in entries)

    def update(self, hardware: str, entries: dict[str, Baseline]) -> UpdateSummary:
        """Merge ``entries`` into the hardware key's file, keeping every other entry."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / file_name(hardware)
        summary = UpdateSummary(path=path)
        with locked(self.directory):
            current: dict[str, Baseline] = {}
            if path.exists():
                try:
                    _, current = parse(path, _read(path))
                except BaselineError:
                    summary.backup = path.with_name(path.name + ".bak")
                    os.replace(path, summary.backup)
            for nodeid in sorted(entries):
                (summary.replaced if nodeid in current else summary.added).append(nodeid)
            current.update(entries)
            write_atomic(path, dumps(hardware, current))
        self.by_hardware[hardware] = current
        return summary


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot be read ({exc.__class__.__name__}: {exc})") from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8) to ``path`` so that readers see the old file or the new one, never a part."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Hold an exclusive POSIX advisory lock on ``directory`` itself (no lock file to commit)."""
    try:
        import fcntl
    except ImportError:  # Windows: runs there are not expected to share a checkout
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock
