"""The machine-readable report: one JSON document per run, readable back into results."""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Any

from pytest_gpumem.core.sample import STATUSES, TestResult

SCHEMA = "pytest-gpumem/results/v1"


def build(results: list[TestResult], environment: dict[str, Any]) -> dict[str, Any]:
    """The report document: schema, environment, a count per status, and every test sorted by nodeid.

    Each test is :meth:`TestResult.to_dict` with its verdict's status copied to
    a top-level ``status`` key, so that tools can filter without digging. Its
    verdict names the deciding ``device``; a test measured on several devices
    also has every device's numbers in the verdict's ``devices``.
    """
    counts = Counter(r.verdict.status for r in results)
    tests = [{**r.to_dict(), "status": r.verdict.status} for r in sorted(results, key=lambda r: r.nodeid)]
    return {
        "schema": SCHEMA,
        "environment": environment,
        "summary": {status: counts.get(status, 0) for status in STATUSES},
        "tests": tests,
    }


def dumps(doc: dict[str, Any]) -> str:
    """``doc`` as deterministic JSON: sorted keys, two-space indent, trailing newline."""
    return json.dumps(doc, sort_keys=True, indent=2) + "\n"


def load(path: str | os.PathLike[str]) -> tuple[dict[str, Any], list[TestResult]]:
    """Read a report written from :func:`build`: its environment and its results.

    Raises ValueError, naming the file, if it is not valid JSON or not a
    ``pytest-gpumem/results/v1`` document.
    """
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ValueError(f"{os.fspath(path)}: not valid JSON ({exc})") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{os.fspath(path)}: expected a {SCHEMA} document, found schema {schema!r}")
    try:
        results = [TestResult.from_dict(test) for test in doc["tests"]]
        environment = doc["environment"]
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{os.fspath(path)}: malformed {SCHEMA} document ({type(exc).__name__}: {exc})") from None
    return environment, results
