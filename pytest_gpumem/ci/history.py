"""The history store: every run's peaks in one table, and where a test's memory stepped up.

Baselines say what a test may use; the history says how that came to be.
Each run can append one row per test and metric (``--gpumem-history PATH``)
with the commit, branch, hardware key, backend and library versions it ran
with. The table is a Parquet file when the path ends in ``.parquet`` (needs
pyarrow) and a CSV file otherwise, read and written with pandas (the
``history`` extra). Appends re-read the file under a lock on its directory
and replace it atomically, so parallel jobs that share it add to it rather
than clobber it, and a file that is not a history table stops the append
with an error naming it and is left as it is.

Step detection looks for the commit where a series moved to a new level and
stayed there, not for the last run that differs from the one before: one
noisy run is not a step, and a step is named by the first commit of the new
level even when it is found runs later.
"""

from __future__ import annotations

import io
import os
import statistics
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pytest_gpumem.core.atomic import locked, write_atomic
from pytest_gpumem.core.sample import METRICS, TestResult, largest
from pytest_gpumem.core.units import Tolerance

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ("time", "commit", "branch", "hardware", "backend", "nodeid", "metric", "value", "baseline", "status")
"""The columns every history table has, in this order; one column per library version follows them."""
SERIES = ("hardware", "backend", "nodeid", "metric")
"""What makes one series: a test's metric on one hardware key and backend (others are never compared)."""
NUMERIC = ("value", "baseline")

STEP_TOLERANCE = Tolerance(percent=2.0, floor=2**20)
"""A change smaller than 2% of the level, or than 1 MiB, is noise, not a step."""
SUSTAIN = 2
"""How many consecutive runs a new level must hold before it counts as a step."""

EXTRA_HINT = "pip install 'pytest-gpumem[history]'"
FORMATS = "a history is a CSV table, or Parquet where the name ends in .parquet, as --gpumem-history writes it"


class HistoryError(Exception):
    """A history file that cannot be read or written, or a missing library; the message names it."""


@dataclass(frozen=True)
class RunInfo:
    """Where a run sits in the project's history: when, which commit, which branch."""

    time: str
    commit: str
    branch: str


def run_info(cwd: Path | None = None, env: Mapping[str, str] | None = None) -> RunInfo:
    """The current run's time (UTC), commit and branch.

    The commit is ``GPUMEM_COMMIT``, else ``GITHUB_SHA``, else ``git rev-parse HEAD``;
    the branch ``GPUMEM_BRANCH``, else ``GITHUB_HEAD_REF`` (a pull request's
    source branch), else ``GITHUB_REF_NAME``, else git's current branch. Either
    is empty where none of those is known (no git, a detached HEAD).
    """
    env = os.environ if env is None else env
    commit = env.get("GPUMEM_COMMIT") or env.get("GITHUB_SHA") or _git(cwd, "rev-parse", "HEAD")
    branch = (
        env.get("GPUMEM_BRANCH")
        or env.get("GITHUB_HEAD_REF")
        or env.get("GITHUB_REF_NAME")
        or _git(cwd, "rev-parse", "--abbrev-ref", "HEAD")
    )
    if branch == "HEAD":  # what git answers on a detached HEAD
        branch = ""
    now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
    return RunInfo(time=now, commit=commit, branch=branch)


def _git(cwd: Path | None, *args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout.strip()


def rows(results: Sequence[TestResult], software: Mapping[str, str], info: RunInfo) -> list[dict[str, Any]]:
    """One row per test and metric: the call phase's peak (the judged number), the baseline's, and
    the verdict on the row of the metric that was judged (empty on metrics only read)."""
    versions = {name: version for name, version in software.items() if name not in COLUMNS}
    out = []
    for result in sorted(results, key=lambda r: (r.nodeid, r.hardware)):
        for metric in METRICS:
            value = result.sample.value(metric)
            judged = metric == result.verdict.metric
            if value is None and not judged:
                continue
            if judged and value is None:  # a test that ran out of memory before its first phase closed
                value = result.verdict.value
            out.append(
                {
                    "time": info.time,
                    "commit": info.commit,
                    "branch": info.branch,
                    "hardware": result.hardware,
                    "backend": result.sample.backend,
                    "nodeid": result.nodeid,
                    "metric": metric,
                    "value": value,
                    "baseline": largest(result.baseline.metrics, metric) if result.baseline else None,
                    "status": result.verdict.status if judged else "",
                    **versions,
                }
            )
    return out


# -- the file


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise HistoryError(f"the history needs pandas, which is not installed: {EXTRA_HINT}") from None
    return pandas


def _is_parquet(path: Path) -> bool:
    return path.suffix.lower() == ".parquet"


def _parquet_engine(path: Path) -> None:
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        raise HistoryError(
            f"{path}: a .parquet history needs pyarrow, which is not installed: pip install pyarrow"
        ) from None


def require_libraries(path: Path) -> None:
    """Raise HistoryError, naming what to install, unless the libraries that write ``path`` are importable:
    checked when the run starts, so that a missing one does not surface after the whole suite has run."""
    _pandas()
    if _is_parquet(path):
        _parquet_engine(path)


def load(path: str | os.PathLike[str]) -> pd.DataFrame:
    """The history table at ``path``, oldest run first, with ``value``/``baseline`` as nullable ints.

    An empty file is an empty history. Raises HistoryError, one line naming the
    file, if it is missing, unreadable, JSON (a results file given by mistake),
    or lacks the history's columns.
    """
    pd = _pandas()
    path = Path(path)
    if not path.exists():
        raise HistoryError(f"{path}: no such history file")
    if path.stat().st_size == 0:
        return _typed(pd.DataFrame(columns=list(COLUMNS)))
    try:
        if _is_parquet(path):
            _parquet_engine(path)
            frame = pd.read_parquet(path)
        else:
            if _is_json(path):
                raise HistoryError(f"{path}: holds JSON (a --gpumem-json results file?), not a history: {FORMATS}")
            frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except HistoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - pandas and pyarrow raise many kinds; the message says which
        reason = (str(exc).strip().splitlines() or [""])[0]  # pandas' messages can run over several lines
        raise HistoryError(
            f"{path}: not a readable history table ({type(exc).__name__}: {reason}); {FORMATS}"
        ) from None
    missing = [c for c in COLUMNS if c not in frame.columns]
    if missing:
        raise HistoryError(f"{path}: not a pytest-gpumem history table (missing columns: {', '.join(missing)})")
    try:
        return _typed(frame)
    except (ValueError, TypeError) as exc:
        raise HistoryError(f"{path}: malformed history table ({exc})") from None


def _is_json(path: Path) -> bool:
    """Whether the file starts as a JSON object or array does (no CSV history can: its header is ``time,...``)."""
    with open(path, "rb") as f:
        return f.read(256).lstrip()[:1] in (b"{", b"[")


def _typed(frame: pd.DataFrame) -> pd.DataFrame:
    """Text columns as str (a commit like ``1234567`` stays text), numbers as nullable ints, oldest first."""
    pd = _pandas()
    frame = frame.copy()
    for column in frame.columns:
        if column in NUMERIC:
            # through Python ints, not floats: byte counts stay exact, and "" (CSV) or None is missing
            ints = [None if v is None or pd.isna(v) or v == "" else int(v) for v in frame[column]]
            frame[column] = pd.array(ints, dtype="Int64")
        else:
            frame[column] = frame[column].fillna("").astype(str)
    order = pd.to_datetime(frame["time"], utc=True, format="ISO8601", errors="coerce")
    if order.isna().any():
        bad = frame["time"][order.isna()].iloc[0]
        raise ValueError(f"time {bad!r} is not an ISO 8601 timestamp")
    frame = frame.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True)


def append(
    path: str | os.PathLike[str],
    results: Sequence[TestResult],
    software: Mapping[str, str],
    info: RunInfo | None = None,
) -> int:
    """Add the run's rows to the history at ``path`` (created if missing); returns how many were added.

    The file is re-read and replaced under an exclusive lock on its directory,
    so concurrent appends from parallel jobs are all kept. A file that is not
    a history table raises HistoryError and is not touched.
    """
    pd = _pandas()
    path = Path(path)
    new = rows(results, software, info or run_info(path.parent))
    if not new:
        return 0
    if _is_parquet(path):
        _parquet_engine(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with locked(path.parent):
        added = _typed(pd.DataFrame(new))
        frame = pd.concat([load(path), added], ignore_index=True) if path.exists() else added
        ordered = list(COLUMNS) + [c for c in frame.columns if c not in COLUMNS]
        _write(path, frame[ordered])
    return len(new)


def _write(path: Path, frame: pd.DataFrame) -> None:
    """Render the whole table in memory, then replace the file atomically (see :mod:`.atomic`)."""
    if _is_parquet(path):
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        write_atomic(path, buffer.getvalue())
    else:
        write_atomic(path, frame.to_csv(index=False))


# -- reading it: trends and steps


@dataclass(frozen=True)
class Point:
    """One run of one series."""

    time: str
    commit: str
    branch: str
    value: int


@dataclass
class Series:
    """A test's metric on one hardware key and backend, oldest run first."""

    hardware: str
    backend: str
    nodeid: str
    metric: str
    points: list[Point]

    @property
    def label(self) -> str:
        return f"{self.nodeid} ({self.metric}, {self.hardware})"

    @property
    def values(self) -> list[int]:
        return [p.value for p in self.points]


@dataclass(frozen=True)
class Trend:
    """A series in numbers: where it started and ended, its range, and how many runs it has."""

    series: Series
    first: int
    last: int
    low: int
    high: int
    runs: int

    @property
    def change(self) -> int:
        return self.last - self.first


@dataclass(frozen=True)
class Step:
    """A sustained change of level in a series: ``commit`` is the first run of the new level."""

    series: Series
    index: int
    commit: str
    time: str
    before: int
    after: int

    @property
    def delta(self) -> int:
        return self.after - self.before


def series(frame: pd.DataFrame, branch: str | None = None) -> list[Series]:
    """The table's series (rows without a value left out), sorted by test, metric, hardware; ``branch``
    keeps only that branch's runs."""
    if branch is not None:
        frame = frame[frame["branch"] == branch]
    frame = frame[frame["value"].notna()]
    out = []
    for key, group in frame.groupby(list(SERIES), sort=False):
        hardware, backend, nodeid, metric = (str(part) for part in key)
        points = [
            Point(str(row.time), str(row.commit), str(row.branch), int(row.value))
            for row in group.itertuples(index=False)
        ]
        out.append(Series(hardware, backend, nodeid, metric, points))
    metric_rank = {m: i for i, m in enumerate(METRICS)}
    return sorted(out, key=lambda s: (s.nodeid, metric_rank.get(s.metric, len(METRICS)), s.hardware, s.backend))


def trend(s: Series) -> Trend:
    values = s.values
    return Trend(s, first=values[0], last=values[-1], low=min(values), high=max(values), runs=len(values))


def change_points(values: Sequence[int], tolerance: Tolerance = STEP_TOLERANCE, sustain: int = SUSTAIN) -> list[int]:
    """Indices where a new level begins that holds for at least ``sustain`` runs.

    The current level is the median of the runs since the last change point
    (a median, so one outlier does not move it). A run starts a new level when
    it and the ``sustain - 1`` runs after it all lie beyond ``tolerance`` of
    the current level, on the same side, and within ``tolerance`` of their own
    median. A lone spike, or a last run not yet confirmed, is not a step.
    Levels that end up within ``tolerance`` of the one before (a slow drift
    split in two) are joined again.
    """
    if sustain < 1:
        raise ValueError(f"sustain must be at least 1, got {sustain}")
    points: list[int] = []
    start = 0
    for i in range(1, len(values) - sustain + 1):
        level = statistics.median(values[start:i])
        window = values[i : i + sustain]
        allowed = tolerance.allowed(round(level))
        up = all(v - level > allowed for v in window)
        down = all(level - v > allowed for v in window)
        new = statistics.median(window)
        steady = all(abs(v - new) <= tolerance.allowed(round(new)) for v in window)
        if (up or down) and steady:
            points.append(i)
            start = i
    # Join neighbouring levels whose medians, over the whole level, are within tolerance.
    changed = True
    while changed:
        changed = False
        bounds = [0, *points, len(values)]
        for k in range(1, len(bounds) - 1):
            before = statistics.median(values[bounds[k - 1] : bounds[k]])
            after = statistics.median(values[bounds[k] : bounds[k + 1]])
            if abs(after - before) <= tolerance.allowed(round(before)):
                points.remove(bounds[k])
                changed = True
                break
    return points


def steps(s: Series, tolerance: Tolerance = STEP_TOLERANCE, sustain: int = SUSTAIN) -> list[Step]:
    """The series' sustained steps, each with the median level before and after it."""
    values = s.values
    points = change_points(values, tolerance, sustain)
    bounds = [0, *points, len(values)]
    out = []
    for k, index in enumerate(points, start=1):
        before = round(statistics.median(values[bounds[k - 1] : bounds[k]]))
        after = round(statistics.median(values[bounds[k] : bounds[k + 1]]))
        point = s.points[index]
        out.append(Step(s, index, point.commit, point.time, before, after))
    return out
