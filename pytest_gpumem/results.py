"""The run's results, on the controller (or in a run without xdist): gathered from the reports, written at
the end (baselines, JSON, Markdown, history, exports) and summarised in the terminal.

A test's result travels on its call's report as the attribute ``gpumem`` (a plain dict, which pytest-xdist
serializes with the report), its leak on its teardown's report as ``gpumem_leak``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from pytest_gpumem.ci import export, history
from pytest_gpumem.ci.history import HistoryError
from pytest_gpumem.config.settings import Settings
from pytest_gpumem.core.atomic import Interrupted, write_atomic
from pytest_gpumem.core.sample import Baseline, Leak, TestResult
from pytest_gpumem.core.store import BaselineError, BaselineStore, UpdateSummary
from pytest_gpumem.report import json_report, markdown
from pytest_gpumem.report.terminal import summary_lines

RESULT = "gpumem"
"""The report attribute that carries a test's result (``TestResult.to_dict()``) from its call."""
LEAK = "gpumem_leak"
"""The report attribute that carries a test's leak (``Leak.to_dict()``) from its teardown."""


class RunResults:
    """Every test's result, in the order the reports came, and what writing them at the end said."""

    def __init__(self, settings: Settings, store: BaselineStore) -> None:
        self.settings = settings
        self.store = store
        self.results: list[TestResult] = []
        self._latest: dict[str, TestResult] = {}  # each test's latest result, for its teardown's leak
        self.updates: list[UpdateSummary] = []
        self.errors: list[str] = []
        self.interrupted = False  # Ctrl-C (or pytest.exit) ended the run early

    def add(self, result: TestResult) -> None:
        self.results.append(result)
        self._latest[result.nodeid] = result

    def add_leak(self, nodeid: str, leak: dict[str, Any]) -> None:
        """A teardown's leak belongs to the result its test's call sent just before (none for a skipped test)."""
        result = self._latest.get(nodeid)
        if result is not None:
            result.leak = Leak.from_dict(leak)

    # -- at the end

    def write(self, session: pytest.Session, software: dict[str, str]) -> None:
        """Write every output asked for; one that cannot be written is named in :attr:`errors` and the others
        are still written. Ctrl-C while writing leaves each file the old one or the new one."""
        environment = {
            "backends": sorted({r.sample.backend for r in self.results}),
            "hardware": sorted({r.hardware for r in self.results}),
            "software": software,
        }
        self.interrupted = self.interrupted or session.exitstatus == pytest.ExitCode.INTERRUPTED
        settings = self.settings
        try:
            if settings.update_baselines and self.results:
                if self.interrupted:  # the tests it reached only, the last perhaps cut short: not a baseline
                    self.errors.append("gpumem: baselines not updated: the run was interrupted")
                else:
                    with self._writing(session, "the baselines (--gpumem-update-baselines)"):
                        self._update_baselines(software)
            if settings.json:
                with self._writing(session, "the JSON report (--gpumem-json)"):
                    _write(settings.json, json_report.dumps(json_report.build(self.results, environment)))
            if settings.markdown:
                with self._writing(session, "the Markdown report (--gpumem-markdown)"):
                    text = markdown.render(self.results, environment, settings.warn_only)
                    _write(settings.markdown, text)
                summary = os.environ.get("GITHUB_STEP_SUMMARY")
                if summary:
                    with self._writing(session, "the job summary ($GITHUB_STEP_SUMMARY)"):
                        with open(summary, "a", encoding="utf-8") as handle:  # appended to, as GitHub asks
                            handle.write(text)
            if settings.history:
                with self._writing(session, "the history (--gpumem-history)"):
                    info = history.run_info(Path(session.config.rootpath))
                    history.append(settings.history, self.results, software, info)
            for target in settings.export:
                with self._writing(session, f"the {target.format} export (--gpumem-export)"):
                    _write(target.path, export.render(target.format, self.results))
        except KeyboardInterrupt as exc:  # Ctrl-C while writing: one line, not a traceback
            if isinstance(exc, Interrupted):
                self.errors.append(f"gpumem: {exc}; nothing after it was written")
            else:
                self.errors.append("gpumem: interrupted while writing results; each file is the old one or the new one")
            session.exitstatus = pytest.ExitCode.INTERRUPTED

    @contextmanager
    def _writing(self, session: pytest.Session, what: str) -> Iterator[None]:
        """Report an output that could not be written, naming it, and go on with the next."""
        try:
            yield
        except (OSError, BaselineError, HistoryError) as exc:
            self.errors.append(f"gpumem: could not write {what}: {exc}")
            session.exitstatus = pytest.ExitCode.INTERNAL_ERROR

    def _update_baselines(self, software: dict[str, str]) -> None:
        now = datetime.now(timezone.utc).replace(microsecond=0).isoformat()
        by_hardware: dict[str, dict[str, Baseline]] = {}
        for result in self.results:
            if result.passed and result.verdict.status != "over_budget":
                by_hardware.setdefault(result.hardware, {})[result.nodeid] = Baseline(
                    metrics=result.sample.phases.get("call", {}),
                    phases=result.sample.phases,
                    software=software,
                    recorded=now,
                    backend=result.sample.backend,
                    attribution=result.sample.attribution,
                )
        for hardware, entries in sorted(by_hardware.items()):
            self.updates.append(self.store.update(hardware, entries))

    def summary(self, terminalreporter: Any) -> None:
        if not self.results and not self.errors:
            return
        terminalreporter.section("gpumem")
        for line in summary_lines(
            self.results, warn_only=self.settings.warn_only, updating=self.settings.update_baselines
        ):
            terminalreporter.write_line(line)
        for update in self.updates:
            line = f"baselines: {update.path}: {len(update.added)} added, {len(update.replaced)} replaced"
            if update.unchanged:
                line += f", {len(update.unchanged)} unchanged"
            if update.backup:
                line += f"; the unreadable file it replaced is kept as {update.backup}"
            terminalreporter.write_line(line)
        for _path, reason in sorted(self.store.unreadable.items()):
            terminalreporter.write_line(f"baselines: ignored while updating: {reason}")
        for error in self.errors:
            terminalreporter.write_line(error, red=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
