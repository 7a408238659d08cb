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
import warnings
from collections.abc import Generator, Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from . import meters, preflight, snapshot, trainer, workers
from .atomic import Interrupted, write_atomic
from .environment import hardware_key, software_versions
from .fixtures import (  # noqa: F401  (the fixtures are registered with the plugin)
    MEASUREMENT,
    gpumem,
    gpumem_model_dir,
    lora,
    quantized_model,
    train_step,
)
from .judge import judge, needed
from .marker import MARKER_HELP, parse_marker
from .measurement import Measurement
from .pinning import PinningError
from .report import json_report, markdown
from .report.terminal import failure_message, summary_lines
from .sample import LEAK_FLAG, Advice, Baseline, Environment, Fit, Leak, OutOfMemory, Spec, TestResult, largest
from .settings import Settings, add_options, resolve
from .store import BaselineError, BaselineStore, UpdateSummary
from .units import BadValue

PLUGIN = pytest.StashKey["GpuMemPlugin"]()
SPEC = pytest.StashKey[Spec]()
MARKER_ERROR = pytest.StashKey[str]()
OOM = pytest.StashKey[OutOfMemory]()  # the out-of-memory error that ended the test's call
LEAK = pytest.StashKey[Leak]()  # what the test left alive after its teardown
PROPERTY = "gpumem"  # the user_properties key that carries a TestResult to the controller
LEAK_PROPERTY = "gpumem-leak"  # and the one that carries its leak, with the teardown's report


def pytest_addoption(parser: pytest.Parser) -> None:
    add_options(parser)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    try:
        settings = resolve(config)
    except BadValue as exc:
        raise pytest.UsageError(str(exc)) from None
    try:
        store = BaselineStore(settings.baselines, tolerate_unreadable=settings.update_baselines)
        if not hasattr(config, "workerinput"):  # only the controller writes
            preflight.check(settings)
        if settings.backend == "cuda":
            meters.resolve_backend("cuda")  # fail now, not in the first test, where no GPU is visible
    except BaselineError as exc:  # named with the option (or variable, or ini key) that chose the directory
        raise pytest.UsageError(f"{settings.source('baselines')}: {exc}") from None
    except BadValue as exc:  # an output the run could not write, named with its option by preflight
        raise pytest.UsageError(str(exc)) from None
    except meters.NoBackend as exc:
        raise pytest.UsageError(f"--gpumem-backend cuda: {exc}") from None
    plugin = GpuMemPlugin(config, settings, store)
    config.stash[PLUGIN] = plugin
    config.pluginmanager.register(plugin, "gpumem-plugin")
    if (settings.gpus_per_worker or settings.pack) and workers.is_xdist_run(config):
        if plugin.is_worker:
            config.pluginmanager.register(workers.Worker(config), "gpumem-worker")
        else:
            try:
                plugin.controller = workers.Controller(config, settings, store)
            except PinningError as exc:
                raise pytest.UsageError(str(exc)) from None
            config.pluginmanager.register(plugin.controller, "gpumem-controller")


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config: pytest.Config) -> int | None:
    """``-n auto`` on GPUs: one worker per GPU group, two with packing (see ``workers.auto_workers``)."""
    try:
        return workers.auto_workers(resolve(config))
    except (BadValue, meters.NoBackend):
        return None  # reported by pytest_configure


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(PLUGIN, None)
    if plugin is not None:
        meters.thaw()  # what the run froze between tests is the interpreter's again
        config.pluginmanager.unregister(plugin)
        del config.stash[PLUGIN]
        if plugin.controller is not None:
            plugin.controller.cleanup()


def settings_of(config: pytest.Config) -> Settings:
    """The run's resolved settings (for fixtures); the defaults where the plugin is disabled."""
    plugin = config.stash.get(PLUGIN, None)
    return plugin.settings if plugin is not None else Settings()


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str | tuple[str, dict[str, bool]]] | None:
    if getattr(report, "gpumem_retried", False):
        return "rerun", "R", ("RERUN", {"yellow": True})  # ran out of memory beside other tests; runs again alone
    if getattr(report, "gpumem_failed", False):
        # A fixture that ran out of memory is an error of the setup, as pytest counts any failed setup.
        return ("failed" if report.when == "call" else "error"), "M", "MEMORY"
    return None


class GpuMemPlugin:
    """The run's state: settings, the meter (made on first use), baselines, results."""

    def __init__(self, config: pytest.Config, settings: Settings, store: BaselineStore) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.is_worker = hasattr(config, "workerinput")
        self.results: list[TestResult] = []
        self._latest: dict[str, TestResult] = {}  # each test's latest result, for its teardown's leak
        self.updates: list[UpdateSummary] = []
        self.errors: list[str] = []
        self.interrupted = False  # Ctrl-C (or pytest.exit) ended the run early
        self._meter: meters.Meter | None = None
        self._environment: Environment | None = None
        self.controller: workers.Controller | None = None  # with xdist and pinning or packing, on the controller

    # -- the meter and the environment, made when the first measured test runs

    @property
    def meter(self) -> meters.Meter:
        if self._meter is None:
            try:
                # Workers that share a GPU count only their own process's use of it as `device`.
                own_process = self.settings.pack and self.is_worker
                self._meter = meters.create(
                    self.settings.backend, gpu=self.settings.estimate_gpu, own_process=own_process
                )
            except meters.NoBackend as exc:
                raise pytest.UsageError(f"--gpumem-backend {self.settings.backend}: {exc}") from None
        return self._meter

    @property
    def environment(self) -> Environment:
        if self._environment is None:
            backend = self.meter.backend
            hardware = hardware_key(backend, self.settings.estimate_gpu)
            self._environment = Environment(backend, hardware, software_versions())
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
        lines = [
            f"gpumem: backend {meters.resolve_backend(self.settings.backend)}, "
            f"baselines {self.settings.baselines}{mode} [{keys}]"
        ]
        if self.controller is not None:
            lines.append("gpumem: " + self.controller.describe())
        elif self.settings.pack or self.settings.gpus_per_worker:
            lines.append("gpumem: --gpumem-pack and --gpumem-gpus-per-worker act on pytest-xdist workers (-n N)")
        return lines

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        for key in (OOM, LEAK, MARKER_ERROR):  # a test run again (retried alone) starts afresh
            if key in item.stash:  # type: ignore[misc]
                del item.stash[key]  # type: ignore[misc]
        if not self._is_measured(item):
            return (yield)
        marker = item.get_closest_marker("gpumem")
        bad = None
        try:
            spec = parse_marker(
                marker.args if marker else (),
                marker.kwargs if marker else {},
                default_tolerance=self.settings.tolerance,
                metrics=self.meter.metrics,
                backend=self.meter.backend,
                where=f"gpumem marker of {item.nodeid}",
                default_device_limit=self.settings.device_limit,
                default_leak=self.settings.leak,
            )
        except BadValue as exc:
            bad = str(exc)
        else:
            item.stash[SPEC] = spec
            meters.freeze_between_tests()  # later collections skip what earlier tests left (see meters)
            try:
                measurement = Measurement(
                    self.meter, snapshot=self.settings.snapshot is not None, limit=spec.device_limit
                )
            except ValueError as exc:  # a device limit this backend or device cannot enforce
                bad = f"gpumem: {item.nodeid}: {exc}"
        if bad is not None:
            # Raised from the plain hook below: a wrapper that raises before it yields would keep the other
            # plugins' setup wrappers from running. Yielded outside the except blocks above, or pytest would
            # print the error twice, the second "during handling of" the first.
            item.stash[MARKER_ERROR] = bad
            return (yield)
        item.stash[MEASUREMENT] = measurement
        trainer.install()  # a transformers Trainer made by the test reports its model, optimizer and steps
        try:
            with measurement.phase("setup"):
                return (yield)
        except BaseException as error:
            found = measurement.out_of_memory(error)  # a fixture that ran out of memory (a model too large)
            if found is not None:
                item.stash[OOM] = found
            raise

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
        except BaseException as error:
            found = measurement.out_of_memory(error)  # while the tracker still knows the moment it failed
            if found is not None:
                item.stash[OOM] = found
            raise
        finally:
            measurement.finish()

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Any:
        measurement = item.stash.get(MEASUREMENT, None)
        if measurement is not None:
            measurement.finish()  # a failed setup leaves it running
            del item.stash[MEASUREMENT]
            trainer.uninstall()
        try:
            return (yield)
        finally:
            if measurement is not None:
                self._check_leak(item, measurement)  # after the fixtures' teardown: what is left is left behind

    def _check_leak(self, item: pytest.Item, measurement: Measurement) -> None:
        """After the test's teardown: free what can be freed (pytest's hold on a failure, the fixture values,
        the allocator's cache), then judge what the test still left alive as a leak."""
        from . import oom
        from .report.terminal import leak_message
        from .training import GpuMemWarning

        guard = meters.guard(self.meter)
        spec = item.stash.get(SPEC, None)
        if guard is None or spec is None:
            return
        if spec.leak is False:
            return
        measurement.release()
        # pytest drops the fixture values right after the teardown's hooks (the fixtures are finalized by
        # now); drop them here, or a model a fixture returned would look left behind.
        funcargs = getattr(item, "funcargs", None)
        if isinstance(funcargs, dict):
            funcargs.clear()
        peak = largest(measurement.phases.get("call", {}), "allocated") or 0
        leak = oom.check_leak(guard.leftover(), spec.leak, peak, LEAK_FLAG)
        if leak is not None and leak.flagged:
            # Only after a full collection: what the test left may be held by cyclic garbage of objects that
            # outlived earlier tests, which the collection after every test no longer scans (see meters).
            meters.collect_all()
            leak = oom.check_leak(guard.leftover(), spec.leak, peak, LEAK_FLAG)
        if leak is not None:
            item.stash[LEAK] = leak
            if leak.flagged and not (leak.failed and not self.settings.warn_only):
                # Attributed to the test's own line, which the warnings summary then shows.
                path, line, _ = item.location
                warnings.warn_explicit(GpuMemWarning(leak_message(leak)), GpuMemWarning, path, (line or 0) + 1)

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        """A fixture wider than a test was finalized: what it held outlived earlier tests, so it is frozen, and
        if it is cyclic garbage now only a full collection frees it. Worth it where a device holds memory."""
        if fixturedef.scope == "function" or self._meter is None:
            return
        guard = meters.guard(self._meter)
        if guard is not None and any(guard.in_use().values()):
            meters.collect_fully_next()  # the collection after this teardown (or before the next test)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report: pytest.TestReport = yield
        if report.when == "teardown" and LEAK in item.stash:
            self._report_leak(item, report, item.stash[LEAK])
        measurement = item.stash.get(MEASUREMENT, None)
        setup_oom = report.when == "setup" and OOM in item.stash  # a fixture ran out of memory: no call follows
        if not (report.when == "call" or setup_oom) or measurement is None or report.skipped:
            return report
        if self._unseen(item, measurement):
            return report
        result = self._judge(item, measurement, passed=report.passed)
        result.fits = list(measurement.fits)
        kept: list[Any] = []
        if result.verdict.oom is not None:
            kept = self._free_failure(call, measurement)
            spec = item.stash[SPEC]
            if spec.retry_on_oom is not None:
                result.fits.append(self._retry(measurement, spec))
        result.advice = self._advise(measurement, result)
        del kept  # the model and optimizers kept alive for the retry and the what-ifs
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
            if result.verdict.oom is not None:
                report.gpumem_failed = True  # type: ignore[attr-defined]  # its failure is a memory one
        return report

    def _unseen(self, item: pytest.Item, measurement: Measurement) -> bool:
        """Whether the meter could not see the test at all (the estimate backend, for a test whose tensors are
        all real): then it says so in one warning naming the test, and nothing is judged or recorded."""
        from .training import GpuMemWarning

        blind_spot = getattr(self.meter, "blind_spot", None)
        measurement.finish()
        message = blind_spot(item.nodeid) if blind_spot is not None else None
        if message is None:
            return False
        path, line, _ = item.location
        warnings.warn_explicit(GpuMemWarning(message), GpuMemWarning, path, (line or 0) + 1)
        return True

    def _free_failure(self, call: pytest.CallInfo[None], measurement: Measurement) -> list[Any]:
        """Free what a test that ran out of memory still holds through its traceback (the failed step's
        tensors), keeping its registered model and optimizers, which the retry and the what-ifs run again.
        Under --pdb the frames are left for the debugger."""
        from . import oom

        kept = [*measurement.registration.models, *measurement.registration.optimizers]
        if call.excinfo is not None and not self.config.getoption("usepdb", False):
            oom.drop_frames(call.excinfo.value)
            # The failure is rendered; pytest's parsed traceback would keep every frame (and its closures).
            call.excinfo.traceback = call.excinfo.traceback[:1]
        oom.release_cached()
        return kept

    def _retry(self, measurement: Measurement, spec: Spec) -> Fit:
        """Search the registered step's ``retry_on_oom`` knob down, under the test's device limit."""
        from . import oom

        guard = meters.guard(self.meter)
        held = max((guard.leftover() if guard else {}).values(), default=0)
        backend = self.meter.backend
        assert spec.retry_on_oom is not None
        return oom.retry(
            measurement.registration,
            spec.retry_on_oom,
            spec.device_limit,
            lambda: meters.create(backend, attribute=False, gpu=self.settings.estimate_gpu),
            held,
        )

    def _report_leak(self, item: pytest.Item, report: pytest.TestReport, leak: Leak) -> None:
        """Send the leak to the controller with the teardown's report; fail that report over a set limit."""
        from .report.terminal import leak_message

        report.user_properties.append((LEAK_PROPERTY, {"nodeid": item.nodeid, "leak": leak.to_dict()}))
        if leak.failed and report.passed and not self.settings.warn_only:
            report.outcome = "failed"
            report.longrepr = leak_message(leak)

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
            oom=item.stash.get(OOM, None),
        )
        return TestResult(item.nodeid, env.hardware, sample, verdict, passed, baseline)

    def _advise(self, measurement: Measurement, result: TestResult) -> Advice | None:
        """The advisor's levers: for tests that fail on memory; for every test with --gpumem-explain=all.
        Savings are measured by re-running a registered step unless --gpumem-explain=none."""
        policy = self.settings.explain
        if not (result.verdict.failed or policy == "all"):
            return None
        from . import advisor, introspect, oom, whatif

        registration = measurement.registration
        setup = introspect.inspect_setup(
            registration.models, registration.optimizers, registration.knobs, measurement.probe
        )
        measure = None
        if policy != "none" and not registration.models_freed:  # a what-if needs the model alive after the test
            measure = whatif.make_measure(
                registration,
                lambda: meters.create(self.meter.backend, attribute=False, gpu=self.settings.estimate_gpu),
            )
        # Out of memory, the levers act on the peak the test asked for: what was alive at the failure and the
        # request; what they must free is the larger of the request's shortfall and the whole step's overshoot.
        failure = result.verdict.oom
        guard = meters.guard(self.meter)
        if failure is not None and measure is not None and guard is not None:
            measure = oom.remembering(measure)
            failure.overshoot = oom.overshoot(failure, measure, guard.in_use().get(failure.device, 0))
        return advisor.advise(
            oom.demand(failure) if failure is not None else result.sample.attribution,
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

    @pytest.hookimpl(tryfirst=True)  # before the terminal counts a report that is to be retried
    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if self.is_worker:
            return
        for name, value in report.user_properties:
            if name == PROPERTY:
                result = TestResult.from_dict(cast(dict[str, Any], value))
                if self.controller is not None:
                    self.controller.observe(report, result)
                    if self.controller.retry_alone(report, result):
                        report.outcome = "rerun"  # type: ignore[assignment]  # neither passed nor failed
                        report.gpumem_retried = True  # type: ignore[attr-defined]
                        continue
                    first = self.controller.retried.get(result.nodeid)
                    if first is not None:
                        result.retried = first.verdict
                self.results.append(result)
                self._latest[result.nodeid] = result
            elif name == LEAK_PROPERTY:
                self._attach_leak(cast(dict[str, Any], value))

    def _attach_leak(self, value: dict[str, Any]) -> None:
        """A teardown's leak belongs to the result its test's call sent just before (none for a skipped test)."""
        result = self._latest.get(value["nodeid"])
        if result is not None:
            result.leak = Leak.from_dict(value["leak"])

    def pytest_keyboard_interrupt(self) -> None:
        self.interrupted = True

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        from . import export, history  # pandas itself is imported only when a history is written

        if self.is_worker:
            return
        if self.controller is not None:  # a test queued to run alone that never did (an interrupted run)
            ran = {result.nodeid for result in self.results}
            self.results += [first for nodeid, first in self.controller.retried.items() if nodeid not in ran]
        software = self._environment.software if self._environment else software_versions()
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
        from .history import HistoryError

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
