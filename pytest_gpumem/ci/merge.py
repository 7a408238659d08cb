"""Merging the result files of a sharded run into the one document an unsharded run would write.

A suite split over several runners (a CI job matrix, ``pytest --shard``-style
selections) writes one ``--gpumem-json`` file per shard. Each test was
measured and judged once, where it ran, so merging is bookkeeping: the union
of the tests, each kept once, and the union of the environments. What cannot
be reconciled is an error rather than a guess: a test that two files report
differently (it ran twice and measured differently, or the files come from
different runs), or environments that disagree on a library version (the
shards did not run the same software, so one report would misstate it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pytest_gpumem.core.sample import TestResult


class MergeError(ValueError):
    """Result files that cannot be merged into one report; the message names the test or key and the files."""


Shard = tuple[str, dict[str, Any], list[TestResult]]
"""One result file: its name (for messages), its environment and its results."""


def merge(shards: Sequence[Shard]) -> tuple[dict[str, Any], list[TestResult]]:
    """The merged environment and results, sorted by nodeid.

    A test found in several files is kept once if every copy is identical, and
    raises MergeError naming the test and both files otherwise.
    """
    if not shards:
        raise MergeError("nothing to merge: no result files given")
    seen: dict[str, tuple[str, dict[str, Any]]] = {}
    results: list[TestResult] = []
    environment: dict[str, Any] = {}
    for source, env, tests in shards:
        environment = merge_environments(environment, env, _sources(shards, source), "environment")
        for result in tests:
            data = result.to_dict()
            if result.nodeid in seen:
                first, kept = seen[result.nodeid]
                if kept != data:
                    raise MergeError(
                        f"{result.nodeid} is in {first} and {source} with different results; "
                        "merge the shards of one run, each test measured once"
                    )
                continue
            seen[result.nodeid] = (source, data)
            results.append(result)
    return environment, sorted(results, key=lambda r: r.nodeid)


def _sources(shards: Sequence[Shard], current: str) -> str:
    earlier = [name for name, _, _ in shards]
    return ", ".join(earlier[: earlier.index(current) + 1])


def merge_environments(into: dict[str, Any], other: dict[str, Any], sources: str, where: str) -> dict[str, Any]:
    """``into`` and ``other`` combined: lists as their sorted union, objects key by key, other values
    only where equal. A disagreement raises MergeError naming the key (``where``) and ``sources``."""
    merged = dict(into)
    for key, value in other.items():
        path = f"{where}.{key}"
        if key not in merged:
            merged[key] = value
        elif isinstance(merged[key], list) and isinstance(value, list) and _plain(merged[key] + value):
            merged[key] = sorted(set(merged[key]) | set(value))
        elif isinstance(merged[key], dict) and isinstance(value, dict):
            merged[key] = merge_environments(merged[key], value, sources, path)
        elif merged[key] != value:
            raise MergeError(
                f"{path} differs between the files ({sources}): {merged[key]!r} vs {value!r}; "
                "the shards of one run share one environment"
            )
    return merged


def _plain(items: list[Any]) -> bool:
    """Lists of strings (backends, hardware keys) merge as sets; any other list must be equal."""
    return all(isinstance(item, str) for item in items)
