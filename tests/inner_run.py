"""Running an inner pytest session with the plugin's JSON report, for the plugin's own tests."""

from __future__ import annotations

import json

import pytest


def run_by_name(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    """Run the inner session (no cache) with the JSON report; its outcome, and its tests' records keyed by
    their function's name."""
    result = pytester.runpytest("--gpumem-json=out.json", "-p", "no:cacheprovider", *args)
    doc = json.loads((pytester.path / "out.json").read_text())
    return result, {t["nodeid"].split("::")[1]: t for t in doc["tests"]}
