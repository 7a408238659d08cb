"""Baselines on disk: ``baselines/<hardware key>.json``, reviewed in git.

Each file holds one hardware key's entries, keyed by test node id and dumped
deterministically (sorted keys, two-space indent, trailing newline) so that a
pull request's baseline diff reads like a table. An entry keeps what repeats
from run to run: the call phase's peaks (the judged figures), the named
phases, the attribution and the software. The ``setup`` phase is left out:
a broader-scoped fixture is made in the setup of whichever test happens to
run first on its worker, so that figure moves with the scheduling (the JSON
report keeps it). An entry measured again with the same figures is left as
it is, its ``recorded`` time included, so a re-recording changes only what
changed.

Writes are atomic (see :mod:`.atomic`) and serialized by a lock on the
directory, and each write re-reads the file under the lock, so concurrent
runs merge instead of clobbering each other. A file that cannot be read
stops the run; only an explicit update replaces it, and then a copy is kept
beside it as ``.bak``. A file whose ``hardware`` field does not match its
name is never read as another key's file, and never written over.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pytest_gpumem.core.atomic import locked, write_atomic
from pytest_gpumem.core.sample import Baseline

SCHEMA = "pytest-gpumem/baselines/v1"


class BaselineError(Exception):
    """A baseline directory or file that cannot be used; the message names it."""


@dataclass
class UpdateSummary:
    """What an update wrote: for the terminal, so that nothing is replaced silently."""

    path: Path
    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    backup: Path | None = None


UNSTORED_PHASES = ("setup",)
"""Phases measured but not stored: the setup's peak depends on which test made a broader-scoped fixture."""


def file_name(hardware: str) -> str:
    """The file of a hardware key (``estimate:H100`` -> ``estimate-H100.json``)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "-", hardware) + ".json"


def committed(baseline: Baseline) -> Baseline:
    """The part of a measurement that is stored: every phase but the scheduling-dependent ones."""
    return replace(baseline, phases={k: v for k, v in baseline.phases.items() if k not in UNSTORED_PHASES})


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


class MisnamedFile(BaselineError):
    """A baseline file whose ``hardware`` field is not the key its name says: a foreign file, never written
    over, not even by an update."""


def check_name(path: Path, hardware: str) -> None:
    """Raise MisnamedFile unless ``path`` is the file of ``hardware``."""
    if path.name != file_name(hardware):
        raise MisnamedFile(
            f"{path}: its 'hardware' field is {hardware!r} but its file name says {path.stem!r} "
            f"(the file of {hardware!r} is {file_name(hardware)}); fix the field or rename the file"
        )


class BaselineStore:
    """All baseline files of one directory, loaded once per run."""

    def __init__(self, directory: Path, *, tolerate_unreadable: bool = False) -> None:
        """Load every ``*.json`` of ``directory`` (which need not exist yet).

        An unreadable file raises BaselineError, unless ``tolerate_unreadable``
        (an explicit update run): then it is remembered and reported as replaced.
        A file whose hardware field disagrees with its name raises in either case.
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
            check_name(path, hardware)
            self.by_hardware[hardware] = entries

    def lookup(self, hardware: str, nodeid: str) -> Baseline | None:
        return self.by_hardware.get(hardware, {}).get(nodeid)

    def hardware_with(self, nodeid: str) -> list[str]:
        """The hardware keys that hold a baseline for ``nodeid``."""
        return sorted(hw for hw, entries in self.by_hardware.items() if nodeid in entries)

    def update(self, hardware: str, entries: dict[str, Baseline]) -> UpdateSummary:
        """Merge ``entries`` into the hardware key's file, keeping every other entry.

        Each entry is stored as :func:`committed`; one whose stored form is what the
        file holds already (its ``recorded`` time aside) keeps the file's. A file
        that cannot be read is copied to a ``.bak`` first; a misnamed one raises.
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / file_name(hardware)
        summary = UpdateSummary(path=path)
        with locked(self.directory):
            current: dict[str, Baseline] = {}
            raw = _read_bytes(path)
            if raw is not None:
                try:
                    stored, current = parse(path, raw.decode("utf-8"))
                except (BaselineError, UnicodeDecodeError):
                    summary.backup = _backup(path, raw)
                else:
                    check_name(path, stored)
            merged = dict(current)  # the entries not measured now are left exactly as they are
            for nodeid in sorted(entries):
                new = committed(entries[nodeid])
                old = current.get(nodeid)
                if old is None:
                    summary.added.append(nodeid)
                elif replace(new, recorded=old.recorded).to_dict() == committed(old).to_dict():
                    summary.unchanged.append(nodeid)
                    new = replace(new, recorded=old.recorded)  # the same figures, held since then
                else:
                    summary.replaced.append(nodeid)
                merged[nodeid] = new
            write_atomic(path, dumps(hardware, merged))
        self.by_hardware[hardware] = merged
        return summary


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BaselineError(f"{path}: cannot be read ({exc.__class__.__name__}: {exc})") from None


def _read_bytes(path: Path) -> bytes | None:
    """The file's bytes; None where there is no file."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise BaselineError(f"{path}: cannot be read ({exc.__class__.__name__}: {exc})") from None


def _backup(path: Path, raw: bytes) -> Path:
    """A copy of an unreadable file beside it, under a name no earlier backup holds (``.bak``, ``.bak1``, ...).

    A copy, not a rename: until the new file replaces it, the file stays where it was."""
    backup = path.with_name(path.name + ".bak")
    n = 0
    while backup.exists():
        n += 1
        backup = path.with_name(f"{path.name}.bak{n}")
    write_atomic(backup, raw)
    return backup
