"""Results in the formats of the dashboards people already run: Bencher and github-action-benchmark.

- ``bmf``: Bencher Metric Format, ``{"<benchmark>": {"<measure>": {"value": <number>}}}``,
  read by ``bencher run --adapter json --file PATH``. Each test is a benchmark and
  each measured metric a measure (``gpumem-allocated``, ``gpumem-reserved``,
  ``gpumem-device``), valued in bytes.
- ``gab``: github-action-benchmark's ``customSmallerIsBetter`` tool, a JSON list of
  ``{"name", "unit", "value", "extra"}`` objects, one per test and metric, named
  ``"<test> (<metric>)"``; ``extra`` (shown in the chart's tooltip) holds the
  hardware key, the baseline and the verdict.

Both carry one entry per test and metric that was measured (the call phase's
peak above what was resident, the largest over devices: the number the
plugin judges). Tests from more than one hardware key get the key appended to
their name, so that no two entries share one. Values are integers of bytes:
units only at the edges, and both dashboards scale them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_gpumem.core.sample import METRICS, TestResult
from pytest_gpumem.core.units import BadValue, format_bytes

FORMATS = ("bmf", "gab")
MEASURE_PREFIX = "gpumem-"
"""Bencher measures are shared by a project's benchmarks; the prefix says whose these are."""


@dataclass(frozen=True)
class Export:
    """One ``--gpumem-export`` target: a format of :data:`FORMATS` and the file it is written to."""

    format: str
    path: Path


def parse_exports(value: object, where: str, base: Path = Path()) -> tuple[Export, ...]:
    """Targets from ``"bmf=PATH"`` or a comma-separated list ``"bmf=a.json,gab=b.json"``.

    Relative paths are taken relative to ``base``. Raises BadValue, naming the
    item and ``where`` it came from, for an item without ``=``, an unknown
    format or an empty path.
    """
    if not isinstance(value, str) or not value.strip():
        raise BadValue(f"{where}: expected FORMAT=PATH (formats: {', '.join(FORMATS)}), got {value!r}")
    exports = []
    for item in value.split(","):
        item = item.strip()
        fmt, sep, path = item.partition("=")
        fmt, path = fmt.strip().lower(), path.strip()
        if not sep:
            raise BadValue(f"{where}: {item!r} is not FORMAT=PATH; e.g. bmf=gpumem-bmf.json")
        if fmt not in FORMATS:
            raise BadValue(f"{where}: unknown export format {fmt!r} in {item!r}; choose one of {', '.join(FORMATS)}")
        if not path:
            raise BadValue(f"{where}: {item!r} names no file to write the {fmt} export to")
        try:
            target = Path(path).expanduser()
        except RuntimeError:  # pathlib's answer to an unknown ~user
            raise BadValue(f"{where}: {item!r}: cannot expand ~ (no such user, or no home directory)") from None
        exports.append(Export(fmt, base / target))
    return tuple(exports)


def _entries(results: list[TestResult]) -> list[tuple[str, str, int, TestResult]]:
    """``(name, metric, bytes, result)`` for every measured metric of every test, sorted by name then metric."""
    several = len({r.hardware for r in results}) > 1
    entries = []
    for result in results:
        name = f"{result.nodeid} [{result.hardware}]" if several else result.nodeid
        for metric in METRICS:
            value = result.sample.value(metric)
            if value is not None:
                entries.append((name, metric, value, result))
    return sorted(entries, key=lambda e: (e[0], METRICS.index(e[1])))


def bmf(results: list[TestResult]) -> dict[str, dict[str, dict[str, int]]]:
    """Bencher Metric Format: ``{test: {"gpumem-<metric>": {"value": bytes}}}``."""
    doc: dict[str, dict[str, dict[str, int]]] = {}
    for name, metric, value, _ in _entries(results):
        doc.setdefault(name, {})[MEASURE_PREFIX + metric] = {"value": value}
    return doc


def gab(results: list[TestResult]) -> list[dict[str, Any]]:
    """github-action-benchmark ``customSmallerIsBetter``: ``[{"name", "unit", "value", "extra"}]``."""
    doc = []
    for name, metric, value, result in _entries(results):
        extra = [f"hardware {result.hardware}, {result.sample.backend} backend"]
        if metric == result.verdict.metric:
            if result.verdict.devices and result.verdict.device:
                extra.append(f"decided on {result.verdict.device}")
            if result.verdict.baseline is not None:
                extra.append(f"baseline {format_bytes(result.verdict.baseline)}")
            if result.verdict.budget is not None:
                extra.append(f"budget {format_bytes(result.verdict.budget)}")
            extra.append(f"verdict {result.verdict.status}")
        doc.append({"name": f"{name} ({metric})", "unit": "bytes", "value": value, "extra": "\n".join(extra)})
    return doc


def render(fmt: str, results: list[TestResult]) -> str:
    """The export document of ``fmt`` as deterministic JSON text (sorted keys, trailing newline)."""
    if fmt == "bmf":
        doc: Any = bmf(results)
    elif fmt == "gab":
        doc = gab(results)
    else:
        raise ValueError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"
