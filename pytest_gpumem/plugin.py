"""pytest hooks: options, the marker, the test protocol, the xdist relay. Wiring only.

:class:`GpuMemPlugin` is built in ``pytest_configure``, kept in ``config.stash`` and registered. Each
measured test is a :class:`~pytest_gpumem.measured.MeasuredTest` in ``item.stash``: the hooks start it,
let it judge and explain the test right after the body, and copy its result onto the report. Under
pytest-xdist every worker measures and judges its own tests and the result travels on the report (an
attribute that xdist serializes); only the controller (or a run without xdist) gathers the results
(:class:`~pytest_gpumem.results.RunResults`) and writes baselines and reports.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest

from pytest_gpumem.config import backend, preflight
from pytest_gpumem.config.marker import MARKER_HELP
from pytest_gpumem.config.settings import Settings, add_options, resolve
from pytest_gpumem.core.sample import Environment, TestResult
from pytest_gpumem.core.store import BaselineError, BaselineStore
from pytest_gpumem.core.units import BadValue
from pytest_gpumem.fixtures import (  # noqa: F401  (the fixtures are registered with the plugin)
    gpumem,
    gpumem_model_dir,
    lora,
    quantized_model,
    train_step,
)
from pytest_gpumem.measure import collector
from pytest_gpumem.measure.machine import hardware_key, replay_gpu, software_versions, visible_gpus
from pytest_gpumem.measure.meters.base import Meter, guard
from pytest_gpumem.measured import Context, MeasuredTest, attributes_every_test
from pytest_gpumem.report.terminal import failure_message, leak_message
from pytest_gpumem.results import LEAK, RESULT, RunResults
from pytest_gpumem.stash import MEASURED, SETTINGS
from pytest_gpumem.xdist import workers
from pytest_gpumem.xdist.pinning import PinningError

PLUGIN = pytest.StashKey["GpuMemPlugin"]()


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
            backend.resolve_backend("cuda")  # fail now, not in the first test, where no GPU is visible
    except BaselineError as exc:  # named with the option (or variable, or ini key) that chose the directory
        raise pytest.UsageError(f"{settings.source('baselines')}: {exc}") from None
    except BadValue as exc:  # an output the run could not write, named with its option by preflight
        raise pytest.UsageError(str(exc)) from None
    except backend.NoBackend as exc:
        raise pytest.UsageError(f"--gpumem-backend cuda: {exc}") from None
    plugin = GpuMemPlugin(config, settings, store)
    config.stash[PLUGIN] = plugin
    config.stash[SETTINGS] = settings
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
    except (BadValue, backend.NoBackend):
        return None  # reported by pytest_configure


def pytest_unconfigure(config: pytest.Config) -> None:
    plugin = config.stash.get(PLUGIN, None)
    if plugin is not None:
        collector.thaw()  # what the run froze between tests is the interpreter's again
        config.pluginmanager.unregister(plugin)
        del config.stash[PLUGIN]
        del config.stash[SETTINGS]
        if plugin.controller is not None:
            plugin.controller.cleanup()


def pytest_report_teststatus(report: pytest.TestReport) -> tuple[str, str, str | tuple[str, dict[str, bool]]] | None:
    if getattr(report, "gpumem_retried", False):
        return "rerun", "R", ("RERUN", {"yellow": True})  # ran out of memory beside other tests; runs again alone
    if getattr(report, "gpumem_failed", False):
        # A fixture that ran out of memory is an error of the setup, as pytest counts any failed setup.
        return ("failed" if report.when == "call" else "error"), "M", "MEMORY"
    return None


class GpuMemPlugin:
    """The run's state: settings, the meter (made on first use), baselines, and the results."""

    def __init__(self, config: pytest.Config, settings: Settings, store: BaselineStore) -> None:
        self.config = config
        self.settings = settings
        self.store = store
        self.is_worker = hasattr(config, "workerinput")
        self.results = RunResults(settings, store)
        self._context: Context | None = None
        self._explaining: Meter | None = None
        self.controller: workers.Controller | None = None  # with xdist and pinning or packing, on the controller

    # -- the meter and the environment, made when the first measured test runs

    @property
    def context(self) -> Context:
        if self._context is None:
            settings = self.settings
            try:
                attributes = attributes_every_test(settings, backend.resolve_backend(settings.backend))
                # Workers that share a GPU count only their own process's use of it as `device`.
                meter = backend.create(
                    settings.backend,
                    attribute=attributes,
                    gpu=settings.estimate_gpu,
                    own_process=settings.pack and self.is_worker,
                )
            except backend.NoBackend as exc:
                raise pytest.UsageError(f"--gpumem-backend {settings.backend}: {exc}") from None
            hardware = hardware_key(meter.backend, settings.estimate_gpu)
            self._context = Context(
                settings=settings,
                meter=meter,
                environment=Environment(meter.backend, hardware, software_versions()),
                store=self.store,
                new_meter=lambda: backend.create(meter.backend, attribute=False, gpu=settings.estimate_gpu),
                replay_gpu=replay_gpu(meter.backend, settings.estimate_gpu),
                gpus=visible_gpus(meter.backend),
                attributes=attributes,
                explaining_meter=self._explaining_meter,
                errors=self.results.errors,
            )
        return self._context

    def _explaining_meter(self) -> Meter:
        """The meter, with the attribution, that a test measured on the fast path runs again under: made
        once, when the first test has something to explain."""
        if self._explaining is None:
            context = self.context
            self._explaining = backend.create(context.meter.backend, attribute=True, gpu=self.settings.estimate_gpu)
        return self._explaining

    def _is_measured(self, item: pytest.Item) -> bool:
        return (
            self.settings.all
            or item.get_closest_marker("gpumem") is not None
            or "gpumem" in getattr(item, "fixturenames", ())
        )

    def pytest_report_header(self, config: pytest.Config) -> list[str]:
        keys = ", ".join(sorted(self.store.by_hardware)) or "none yet"
        mode = " (updating)" if self.settings.update_baselines else ""
        lines = [
            f"gpumem: backend {backend.resolve_backend(self.settings.backend)}, "
            f"baselines {self.settings.baselines}{mode} [{keys}]"
        ]
        if self.controller is not None:
            lines.append("gpumem: " + self.controller.describe())
        elif self.settings.pack or self.settings.gpus_per_worker:
            lines.append("gpumem: --gpumem-pack and --gpumem-gpus-per-worker act on pytest-xdist workers (-n N)")
        return lines

    # -- per test: measured through setup and call, judged and explained right after the body

    @pytest.hookimpl(wrapper=True, trylast=True)  # innermost: inside pytest's capture and pytest-timeout
    def pytest_runtest_setup(self, item: pytest.Item) -> Any:
        if MEASURED in item.stash:  # a test run again (retried alone) starts afresh
            del item.stash[MEASURED]
        if not self._is_measured(item):
            collector.other_test_runs()  # what it leaves is collected before the next measured test
            return (yield)
        test = item.stash[MEASURED] = MeasuredTest(item)
        if not test.start(self.context):
            # Raised from the plain hook below: a wrapper that raises before it yields would keep the other
            # plugins' setup wrappers from running.
            return (yield)
        assert test.measurement is not None
        try:
            with test.measurement.phase("setup"):
                return (yield)
        except BaseException as error:
            test.failed_with(error)  # a fixture that ran out of memory (a model too large)
            if test.oom is not None:  # no call follows: judged and explained now
                test.conclude(self.context, error)
            raise

    @pytest.hookimpl(tryfirst=True, specname="pytest_runtest_setup")
    def pytest_runtest_setup_check_marker(self, item: pytest.Item) -> None:
        test = item.stash.get(MEASURED, None)
        if test is not None and test.error is not None:
            pytest.fail(test.error, pytrace=False)

    @pytest.hookimpl(wrapper=True, trylast=True)  # innermost: the advisor's re-runs are captured and timed
    def pytest_runtest_call(self, item: pytest.Item) -> Any:
        test = item.stash.get(MEASURED, None)
        if test is None or test.measurement is None:
            return (yield)
        error: BaseException | None = None
        try:
            with test.measurement.phase("call"):
                return (yield)
        except BaseException as exc:
            error = exc
            test.failed_with(exc)
            raise
        finally:
            test.conclude(self.context, error)
            del error

    @pytest.hookimpl(wrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Any:
        test = item.stash.get(MEASURED, None)
        if test is not None:
            test.stop()
        try:
            return (yield)
        finally:
            if test is not None:
                test.check_leak(self.context)  # after the fixtures' teardown: what is left is left behind

    def pytest_fixture_post_finalizer(self, fixturedef: pytest.FixtureDef[Any]) -> None:
        """A fixture wider than a test was finalized: what it held outlived earlier tests, so it is frozen, and
        if it is cyclic garbage now only a full collection frees it. Worth it where a device holds memory."""
        if fixturedef.scope == "function" or self._context is None:
            return
        meter_guard = guard(self._context.meter)
        if meter_guard is not None and any(meter_guard.in_use().values()):
            collector.collect_fully_next()  # the collection after this teardown (or before the next test)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(
        self, item: pytest.Item, call: pytest.CallInfo[None]
    ) -> Generator[None, pytest.TestReport, pytest.TestReport]:
        report: pytest.TestReport = yield
        test = item.stash.get(MEASURED, None)
        if test is None:
            return report
        if report.when == "teardown" and test.leak is not None:
            leak = test.leak
            setattr(report, LEAK, {"nodeid": item.nodeid, "leak": leak.to_dict()})
            if leak.failed and report.passed and not self.settings.warn_only:
                report.outcome = "failed"
                report.longrepr = leak_message(leak)
        result = test.result
        concluded_in = "setup" if test.oom is not None and call.when == "setup" else "call"
        if report.when != concluded_in or result is None or report.skipped:
            return report
        if test.longrepr is not None and report.failed:
            report.longrepr = test.longrepr  # rendered before the failure's frames were freed
        setattr(report, RESULT, result.to_dict())
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
        value = getattr(report, RESULT, None)
        if isinstance(value, dict):
            result = TestResult.from_dict(value)
            if self.controller is not None:
                self.controller.observe(report, result)
                if self.controller.retry_alone(report, result):
                    report.outcome = "rerun"  # type: ignore[assignment]  # neither passed nor failed
                    report.gpumem_retried = True  # type: ignore[attr-defined]
                    return
                first = self.controller.retried.get(result.nodeid)
                if first is not None:
                    result.retried = first.verdict
            self.results.add(result)
        leak = getattr(report, LEAK, None)
        if isinstance(leak, dict):
            self.results.add_leak(leak["nodeid"], leak["leak"])

    def pytest_keyboard_interrupt(self) -> None:
        self.results.interrupted = True

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.is_worker:
            return
        if self.controller is not None:  # a test queued to run alone that never did (an interrupted run)
            ran = {result.nodeid for result in self.results.results}
            for nodeid, first in self.controller.retried.items():
                if nodeid not in ran:
                    self.results.add(first)
        software = self._context.environment.software if self._context else software_versions()
        self.results.write(session, software)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        self.results.summary(terminalreporter)
