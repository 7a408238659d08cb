"""pytest hooks: options, the marker, test wrapping, xdist relay, reports. Wiring only.

One stateful object, :class:`GpuMemPlugin`, is built in ``pytest_configure``,
kept in ``config.stash`` and registered; it delegates measuring to a meter,
deciding to the judge, rendering to the reporters and persisting to the store.
Under pytest-xdist every worker measures and judges its own tests and sends
each result to the controller in ``report.user_properties``; only the
controller (or a run without xdist) writes baselines and reports.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from . import meters
from .environment import hardware_key, software_versions
from .fixtures import (  # noqa: F401  (the fixtures are registered with the plugin)
    MEASUREMENT,
    gpumem,
    gpumem_model_dir,
    lora,
    quantized_model,
    train_step,
)
from . import snapshot, trainer
from .judge import judge, needed
from .marker import MARKER_HELP, parse_marker
from .measurement import Measurement
from .report import json_report, markdown
from .report.terminal import failure_message, summary_lines
from .sample import Advice, Baseline, Environment, Spec, TestResult
from .settings import Settings, add_options, resolve
from .store import BaselineError, BaselineStore, UpdateSummary, write_atomic
from .units import BadValue

PLUGIN = pytest.StashKey["GpuMemPlugin"]()
SPEC = pytest.StashKey[Spec]()
MARKER_ERROR = pytest.StashKey[str]()
PROPERTY = "gpumem"  # the user_properties key that carries a TestResult to the controller


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        settings = resolve(config)
        store = BaselineStore(settings.baselines, tolerate_unreadable=settings.update_baselines)
        if settings.backend == "cuda":
            meters.resolve_backend("cuda")  # fail now, not in the first test, where no GPU is visible
    except (BadValue, BaselineError) as exc:
        raise pytest.UsageError(str(exc)) from None
    except meters.NoBackend as exc:
        raise pytest.UsageError(f"--gpumem-backend cuda: {exc}") from None
    plugin = GpuMemPlugin(config, settings, store)
    config.stash[PLUGIN] = plugin
    config.pluginmanager.register(plugin, "gpumem-plugin")


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(PLUGIN, None)
    if plugin is not None:
        config.pluginmanager.unregister(plugin)
        del config.stash[PLUGIN]


def settings_of(config: pytest.Config) -> Settings:
    """The run's resolved settings (for fixtures)."""
    return config.stash[PLUGIN].settings


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str] | None:
    if getattr(report, "gpumem_failed", False):
        return "failed", "M", "MEMORY"
    return None


class GpuMemPlugin:
    """The run's state: settings, the meter (made on first use), baselines, results."""

    def __init__(self, config: pytest.Config, settings: Settings, store: BaselineStore) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.is_worker = hasattr(config, "workerinput")
        self.results: list[TestResult] = []
        self.updates: list[UpdateSummary] = []
        self.errors: list[str] = []
        self._meter: meters.Meter | None = None
        self._environment: Environment | None = None

    # -- the meter and the environment, made when the first measured test runs

    @property
    def meter(self) -> meters.Meter:
        if self._meter is None:
            try:
                self._meter = meters.create(self.settings.backend)
            except meters.NoBackend as exc:
                raise pytest.UsageError(f"--gpumem-backend {self.settings.backend}: {exc}") from None
        return self._meter

    @property
    def environment(self) -> Environment:
        if self._environment is None:
            backend = self.meter.backend
            self._environment = Environment(backend, hardware_key(backend), software_versions())
        return self._environment

    def _is_measured(self, item: pytest.Item) -> bool:
        return (
            self.settings.all
            or item.get_closest_marker("gpumem") is not None
            or "gpumem" in getattr(item, "fixturenames", ())
        )

    # -- per test

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        keys = ", ".join(sorted(self.store.by_hardware)) or "none yet"
        mode = " (updating)" if self.settings.update_baselines else ""
        return [
            f"gpumem: backend {meters.resolve_backend(self.settings.backend)}, "
            f"baselines {self.settings.baselines}{mode} [{keys}]"
        ]

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        if not self._is_measured(item):
            return (yield)
        marker = item.get_closest_marker("gpumem")
        try:
            item.stash[SPEC] = parse_marker(
                marker.args if marker else (),
                marker.kwargs if marker else {},
                default_tolerance=self.settings.tolerance,
                metrics=self.meter.metrics,
                backend=self.meter.backend,
                where=f"gpumem marker of {item.nodeid}",
            )
        except BadValue as exc:
            # Raised from the plain hook below: a wrapper that raises before it
            # yields would keep the other plugins' setup wrappers from running.
            item.stash[MARKER_ERROR] = str(exc)
            return (yield)
        measurement = item.stash[MEASUREMENT] = Measurement(self.meter, snapshot=self.settings.snapshot is not None)
        trainer.install()  # a transformers Trainer made by the test reports its model, optimizer and steps
        with measurement.phase("setup"):
            return (yield)

    @pytest.hookimpl(tryfirst=True, specname="pytest_runtest_setup")
    def pytest_runtest_setup_check_marker(self, item: pytest.Item) -> None:
        if MARKER_ERROR in item.stash:
            pytest.fail(item.stash[MARKER_ERROR], pytrace=False)

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        measurement = item.stash.get(MEASUREMENT, None)
        if measurement is None:
            return (yield)
        try:
            with measurement.phase("call"):
                return (yield)
        finally:
            measurement.finish()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Any:
        measurement = item.stash.get(MEASUREMENT, None)
        if measurement is not None:
            measurement.finish()  # a failed setup leaves it running
            del item.stash[MEASUREMENT]
            trainer.uninstall()
        return (yield)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report: pytest.TestReport = yield
        measurement = item.stash.get(MEASUREMENT, None)
        if report.when != "call" or measurement is None or report.skipped:
            return report
        result = self._judge(item, measurement, passed=report.passed)
        result.advice = self._advise(measurement, result)
        if self.settings.snapshot is not None and result.verdict.status in ("regression", "over_budget"):
            result.snapshot = self._write_snapshot(measurement, item.nodeid)
        report.user_properties.append((PROPERTY, result.to_dict()))
        message = failure_message(result)
        if report.passed and result.verdict.failed and self._enforced(result):
            report.outcome = "failed"
            report.longrepr = message
            report.gpumem_failed = True  # type: ignore[attr-defined]
        else:
            report.sections.append(("gpumem", message))  # shown with the test's own failure, if any
        return report

    def _judge(self, item: pytest.Item, measurement: Measurement, passed: bool) -> TestResult:
        env = self.environment
        baseline = self.store.lookup(env.hardware, item.nodeid)
        sample = measurement.finish()
        verdict = judge(
            sample,
            item.stash[SPEC],
            baseline,
            env.software,
            other_hardware=[hw for hw in self.store.hardware_with(item.nodeid) if hw != env.hardware],
        )
        return TestResult(item.nodeid, env.hardware, sample, verdict, passed, baseline)

    def _advise(self, measurement: Measurement, result: TestResult) -> Advice | None:
        """The advisor's levers: for tests that fail on memory; for every test with --gpumem-explain=all.
        Savings are measured by re-running a registered step unless --gpumem-explain=none."""
        policy = self.settings.explain
        if not (result.verdict.failed or policy == "all"):
            return None
        from . import advisor, introspect, whatif

        registration = measurement.registration
        setup = introspect.inspect_setup(registration.models, registration.optimizers, registration.knobs, measurement.probe)
        measure = None
        if policy != "none" and not registration.models_freed:  # a what-if needs the model alive after the test
            measure = whatif.make_measure(registration, lambda: meters.create(self.meter.backend, attribute=False))
        return advisor.advise(
            result.sample.attribution,
            setup,
            introspect.findings(setup),
            needed(result.verdict),
            registration.knobs,
            measure,
        )

    def _write_snapshot(self, measurement: Measurement, nodeid: str) -> str:
        if measurement.snapshot is None or self.settings.snapshot is None:
            return ""
        try:
            return str(snapshot.write(measurement.snapshot, self.settings.snapshot, nodeid))
        except OSError as exc:
            self.errors.append(f"gpumem: could not write the memory snapshot of {nodeid}: {exc}")
            return ""

    def _enforced(self, result: TestResult) -> bool:
        if self.settings.warn_only:
            return False
        # While re-recording, a changed baseline is the point; budgets still hold.
        return not (self.settings.update_baselines and result.verdict.status != "over_budget")

    # -- results, on the controller

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                self.results.append(TestResult.from_dict(cast(dict[str, Any], value)))

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from .history import HistoryError  # pandas itself is imported only when a history is written

        if self.is_worker:
            return
        software = self._environment.software if self._environment else software_versions()
        environment = {
            "backends": sorted({r.sample.backend for r in self.results}),
            "hardware": sorted({r.hardware for r in self.results}),
            "software": software,
        }
        try:
            if self.settings.update_baselines and self.results:
                self._update_baselines(software)
            if self.settings.json:
                _write(self.settings.json, json_report.dumps(json_report.build(self.results, environment)))
            if self.settings.markdown:
                text = markdown.render(self.results, environment, self.settings.warn_only)
                _write(self.settings.markdown, text)
                if os.environ.get("GITHUB_STEP_SUMMARY"):
                    with open(os.environ["GITHUB_STEP_SUMMARY"], "a", encoding="utf-8") as handle:
                        handle.write(text)
            _write_history_and_exports(self.settings, self.results, software, Path(session.config.rootpath))
        except (OSError, BaselineError, HistoryError) as exc:
            self.errors.append(f"gpumem: could not write results: {exc}")
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

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.results and not self.errors:
            return
        terminalreporter.section("gpumem")
        for line in summary_lines(
            self.results, warn_only=self.settings.warn_only, updating=self.settings.update_baselines
        ):
            terminalreporter.write_line(line)
        for update in self.updates:
            line = f"baselines: {update.path}: {len(update.added)} added, {len(update.replaced)} replaced"
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


def _write_history_and_exports(
    settings: Settings, results: list[TestResult], software: dict[str, str], root: Path
) -> None:
    """Append to ``--gpumem-history`` and write each ``--gpumem-export`` (controller only, like the reports).

    The commit and branch of a history row are those of the rootdir's checkout (or of the CI's variables).
    """
    from . import export, history

    if settings.history:
        history.append(settings.history, results, software, history.run_info(root))
    for target in settings.export:
        _write(target.path, export.render(target.format, results))
