"""One measured test, from its setup to its teardown: what the plugin keeps in ``item.stash``.

The hooks only call into it. The test is measured through its setup and its
call; right after its body (inside the call phase, so under pytest's output
capture and pytest-timeout's timer) it is judged, and a test that failed on
memory is explained: the retry search and the advisor's what-ifs run the
test's training step again there. After its teardown, what it left alive is
judged as a leak. The report then only carries the result.

The fast path: on the backends of :data:`ON_DEMAND_BACKENDS` (unless the
settings ask for the attribution of every test) a test is measured by the
meter's statistics alone, without the attribution's tracker, discovery's
hooks or a probe. A test that has something to explain (it failed on memory,
regressed or improved) then runs its body once more, right there, with all
of them (:meth:`MeasuredTest._run_again`): its attribution and the advisor's
evidence come from that second run, and the report says whether it repeated
the measured peak (see :mod:`pytest_gpumem.measure.rerun`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import pytest

from pytest_gpumem.advise import advisor, findings, whatif
from pytest_gpumem.config.marker import parse_marker
from pytest_gpumem.config.settings import Settings
from pytest_gpumem.core.gpus import Gpu
from pytest_gpumem.core.judge import judge, needed
from pytest_gpumem.core.sample import (
    LEAK_FLAG,
    Advice,
    Environment,
    Leak,
    OutOfMemory,
    Sample,
    Spec,
    TestResult,
    largest,
)
from pytest_gpumem.core.store import BaselineStore
from pytest_gpumem.core.units import BadValue, error_line
from pytest_gpumem.estimate.replay import Replay, plan
from pytest_gpumem.measure import collector, introspect, rerun, snapshot, trainer
from pytest_gpumem.measure.discovery import Discovery, Found
from pytest_gpumem.measure.introspect import TrainingSetup
from pytest_gpumem.measure.measurement import Measurement
from pytest_gpumem.measure.meters.base import Meter, guard
from pytest_gpumem.models.training import GpuMemWarning
from pytest_gpumem.oom import capture
from pytest_gpumem.oom.fit import retry
from pytest_gpumem.oom.leak import check_leak
from pytest_gpumem.report.terminal import leak_message

REPLAY_BACKENDS = ("cuda",)
"""Backends whose tests' own models are replayed for their levers. The replay runs CUDA's kernels on fake
tensors: on the cpu backend the attribution's estimates describe the CPU's own run better (measured: the
checkpointing lever of a tiny Llama LoRA loop, replayed 33% under what the CPU run saved, estimated within
0.1%)."""

ON_DEMAND_BACKENDS = ("cuda", "cpu")
"""Backends whose tests are measured on the fast path under ``--gpumem-attribute=auto``, and run again for
their attribution where there is something to explain. On cuda the allocator keeps the statistics, and the
tracker beside it costs Python work per operator (1.23x a QLoRA step on an H200); on cpu the meter is a
storage tracker either way, and the attribution's records, hooks and discovery beside it cost about 3 ms a
test of a small MLP's five AdamW steps. The estimate backend's run is fake: it keeps the attribution."""

EXPLAINED = ("regression", "over_budget", "oom", "improved")
"""The verdicts whose test is run again on the fast path, for its attribution and the advisor's evidence."""


def attributes_every_test(settings: Settings, backend: str) -> bool:
    """Whether the meter keeps the attribution of every measured test (else: the fast path). Explaining
    every test and recording baselines (which keep the attribution) ask for it."""
    return (
        settings.attribute == "always"
        or settings.explain == "all"
        or settings.update_baselines
        or backend not in ON_DEMAND_BACKENDS
    )


@dataclass
class Context:
    """What a measured test needs of the run: its settings, its meter and environment (made when the first
    measured test runs), its baselines, and how to make another meter for a re-run. ``attributes``: the meter
    keeps the attribution of every test; else ``explaining_meter`` gives the one (with the attribution) that a
    test with something to explain runs again under."""

    settings: Settings
    meter: Meter
    environment: Environment
    store: BaselineStore
    new_meter: Callable[[], Meter]
    replay_gpu: Gpu  # the GPU a test's own model is replayed as, where it registered no step
    gpus: int = 0  # the GPUs visible to the tests (0 on the cpu backend)
    attributes: bool = True
    explaining_meter: Callable[[], Meter] | None = None
    errors: list[str] = field(default_factory=list)


class MeasuredTest:
    """The measurement, verdict and advice of one test (see the module's docstring)."""

    def __init__(self, item: pytest.Item) -> None:
        self.item = item
        self.spec: Spec | None = None
        self.error: str | None = None  # a marker or device limit that cannot be used: the setup fails with it
        self.measurement: Measurement | None = None
        self.oom: OutOfMemory | None = None  # the out-of-memory error that ended the setup or the call
        self.result: TestResult | None = None
        self.leak: Leak | None = None
        self.longrepr: Any = None  # the failure, rendered before its frames were freed
        self._again: Measurement | None = None  # the second run's measurement, while it runs
        self._in_use_at_start: dict[str, int] = {}  # on the fast path, what the meter counted in use at start

    def current(self) -> Measurement | None:
        """The measurement running now (the second run's while the test runs again), for the fixtures."""
        return self._again or self.measurement

    # -- setup and call

    def start(self, context: Context) -> bool:
        """Parse the marker and start measuring; False (with :attr:`error` set) where it cannot."""
        marker = self.item.get_closest_marker("gpumem")
        settings = context.settings
        try:
            self.spec = parse_marker(
                marker.args if marker else (),
                marker.kwargs if marker else {},
                default_tolerance=settings.tolerance,
                metrics=context.meter.metrics,
                backend=context.meter.backend,
                where=f"gpumem marker of {self.item.nodeid}",
                default_device_limit=settings.device_limit,
                default_leak=settings.leak,
            )
        except BadValue as exc:
            self.error = str(exc)
            return False
        collector.freeze_between_tests()  # later collections skip what earlier tests left (see collector)
        try:
            self.measurement = Measurement(
                context.meter,
                snapshot=settings.snapshot is not None,
                limit=self.spec.device_limit,
                explain=context.attributes,
            )
        except ValueError as exc:  # a device limit this backend or device cannot enforce
            self.error = f"gpumem: {self.item.nodeid}: {exc}"
            return False
        if not context.attributes:
            meter_guard = guard(context.meter)
            self._in_use_at_start = meter_guard.in_use() if meter_guard is not None else {}
        trainer.install()  # a transformers Trainer made by the test reports its model, optimizer and steps
        return True

    def failed_with(self, error: BaseException) -> None:
        """Keep the out-of-memory error that ended the setup or the call, while the tracker still knows the
        moment it failed."""
        assert self.measurement is not None
        m = self.measurement
        found = capture.capture(error, m.backend, m.limit, m.attributor)
        if found is not None:
            self.oom = found

    def conclude(self, context: Context, error: BaseException | None) -> None:
        """Judge the test once its body (or its failed setup) is over, and explain a memory failure: free
        what the failure holds, search the retry knob, ask the advisor, write the snapshot."""
        measurement = self.measurement
        if measurement is None or isinstance(error, pytest.skip.Exception):
            return
        measurement.finish()
        if self._unseen(context, measurement):
            return
        result = self._judge(context, measurement, passed=error is None)
        result.fits = list(measurement.fits)
        kept: list[Any] = []
        again = not context.attributes and result.verdict.status in EXPLAINED
        if result.verdict.oom is not None or (again and error is not None):
            # What the failure holds would count in the second run as held by the test; that run makes again
            # what the body made, so the first run's models are kept only where there is none.
            kept = self._free_failure(error, measurement, keep=not again)
        explained = measurement
        if again:
            explained, kept = self._run_again(context, measurement, result)
        if result.verdict.oom is not None:
            assert self.spec is not None
            if self.spec.retry_on_oom is not None:
                meter = context.explaining_meter() if again and context.explaining_meter else context.meter
                result.fits.append(self._retry(context, explained, self.spec, meter))
        result.advice = self._advise(context, explained, result)
        if context.settings.snapshot is not None and result.verdict.status in ("regression", "over_budget"):
            # The first run's, where its meter took one (CUDA's allocator history); else the second run's.
            taken = measurement if measurement.snapshot is not None else explained
            result.snapshot = self._write_snapshot(context, taken)
        del kept, explained  # the model and optimizers kept alive for the retry and the what-ifs
        self.result = result

    def _run_again(self, context: Context, first: Measurement, result: TestResult) -> tuple[Measurement, list[Any]]:
        """Run the test's body once more under a meter that keeps the attribution, with what its setup
        registered, and take the attribution (of the peak, or of the out-of-memory failure) and the advisor's
        evidence from it; ``result.rerun`` says whether it repeated the measured peak. Returns the second
        run's measurement, finished, and the models and optimizers its failure held (for the retry and the
        what-ifs). Its fixtures are not made again: the same values go to the body."""
        assert context.explaining_meter is not None and self.spec is not None
        # What the body registered goes with its run (a step's closure would keep its model alive through the
        # second run), before the collection the meter begins with; the second run registers it again. What
        # the fixtures registered stays.
        first.registration = first.registered_in_setup
        snapshot = context.settings.snapshot is not None
        again = Measurement(context.explaining_meter(), snapshot=snapshot, limit=self.spec.device_limit)
        meter_guard = guard(context.meter)
        resident = rerun.held(meter_guard.in_use() if meter_guard else {}, self._in_use_at_start)
        again.registration = first.registered_in_setup.copy()
        for model in again.registration.models:
            again.register_model(model)  # for the attribution's hooks and a probe
        call = result.sample.phases.get("call", {})
        allocated = call.get("allocated") or {}
        device = max(allocated, key=allocated.__getitem__, default="")  # the device the attribution is of
        known, failure, raised, kept = None, None, "", []
        error = self._run_body(again)
        try:
            if error is not None:
                raised = error_line(error)
                # Kept for the retry and the what-ifs, as the first run's are: until now the frames held them.
                kept = [*again.registration.models, *again.registration.optimizers]
                if again.attributor is not None:
                    failure = capture.capture(error, again.backend, again.limit, again.attributor)
                capture.drop_frames(error)
                del error
            if again.attributor is not None:
                models = [*again.registration.models, *again.discovery.models]
                optimizers = [*again.registration.optimizers, *again.discovery.optimizers]
                known = rerun.untracked(models, optimizers, again.attributor.tracker, device)
        finally:
            again.finish()
        capture.release_cached()
        second = again.phases.get("call", {})
        result.rerun = rerun.compare(call, second, resident, device, raised)
        if known is None:
            return again, kept
        attribution = rerun.complete(again.attribution, device, resident.get(device, 0), known)
        result.sample.attribution = rerun.beside_first(attribution, call)
        oom = result.verdict.oom
        if oom is not None and failure is not None and failure.attribution is not None:
            oom.attribution = rerun.complete(failure.attribution, device, resident.get(device, 0), known)
        return again, kept

    def _unseen(self, context: Context, measurement: Measurement) -> bool:
        """Whether the meter could not see the test at all (the estimate backend, for a test whose tensors are
        all real): then it says so in one warning naming the test, and nothing is judged or recorded."""
        blind_spot = getattr(context.meter, "blind_spot", None)
        message = blind_spot(self.item.nodeid) if blind_spot is not None else None
        if message is None:
            return False
        self._warn(message)
        return True

    def _judge(self, context: Context, measurement: Measurement, passed: bool) -> TestResult:
        env, store, nodeid = context.environment, context.store, self.item.nodeid
        assert self.spec is not None
        baseline = store.lookup(env.hardware, nodeid)
        sample = measurement.finish()
        verdict = judge(
            sample,
            self.spec,
            baseline,
            env.software,
            other_hardware=[hw for hw in store.hardware_with(nodeid) if hw != env.hardware],
            oom=self.oom,
        )
        return TestResult(nodeid, env.hardware, sample, verdict, passed, baseline)

    def _free_failure(self, error: BaseException | None, measurement: Measurement, keep: bool = True) -> list[Any]:
        """Free what a test that ran out of memory still holds through its traceback (the failed step's
        tensors), keeping its registered model and optimizers, which the retry and the what-ifs run again.
        The failure is rendered first, as pytest would render it, since its frames' locals go. Under --pdb
        the frames are left for the debugger."""
        kept = [*measurement.registration.models, *measurement.registration.optimizers] if keep else []
        if error is not None and not self.item.config.getoption("usepdb", False):
            self.longrepr = self.item.repr_failure(pytest.ExceptionInfo.from_exception(error))
            capture.drop_frames(error)
        capture.release_cached()
        return kept

    def _retry(self, context: Context, measurement: Measurement, spec: Spec, meter: Meter) -> Any:
        """Search the registered step's ``retry_on_oom`` knob down, under the test's device limit. ``meter``:
        the one whose run made what the step holds (the second run's, where the body ran again)."""
        assert spec.retry_on_oom is not None
        meter_guard = guard(meter)
        held = max((meter_guard.leftover() if meter_guard else {}).values(), default=0)
        return retry(measurement.registration, spec.retry_on_oom, spec.device_limit, context.new_meter, held)

    def _advise(self, context: Context, measurement: Measurement, result: TestResult) -> Advice | None:
        """The advisor's levers: for tests that fail on memory; for every test with --gpumem-explain=all.
        Savings are measured by re-running a registered step unless --gpumem-explain=none; a test that
        registered none has its own model replayed, and, where it ran out of memory under a simulated device
        limit, its body run again without the limit to see what it needs."""
        policy = context.settings.explain
        if not (result.verdict.failed or policy == "all"):
            return None
        registration = measurement.registration
        measure, measured_as, replay, knobs = None, "measured", None, registration.knobs
        if policy != "none" and not registration.models_freed:  # a what-if needs the model alive after the test
            measure = whatif.make_measure(registration, context.new_meter)
        failure = result.verdict.oom
        found = None if registration.models else measurement.discovery.trained()
        unlimited, discovery = None, measurement.discovery
        # Only a test that ran a model of its own: running a body again repeats what it does besides.
        if failure is not None and failure.limit is not None and measure is None and policy != "none" and found:
            unlimited = self._run_unlimited(context)
        if unlimited is not None:  # what the test ran, as the unlimited run saw it (the failed forward never ended)
            discovery = unlimited.discovery
            found = discovery.trained()
        setup = _setup_of(measurement, found, discovery)
        replayable = found is not None and found.config is not None and setup.backward
        if measure is None and policy != "none" and replayable and context.meter.backend in REPLAY_BACKENDS:
            assert found is not None
            replay, _why = plan(found.config, setup, context.replay_gpu, context.meter.backend == "cuda")
            if replay is not None:
                measure, measured_as, knobs = replay.measure, "replayed", replay.knobs
        # Out of memory, the levers act on the peak the test asked for: what was alive at the failure and the
        # request, or the whole run's peak where it ran again without the limit; what they must free is the
        # larger of the request's shortfall and the whole run's overshoot.
        attribution = capture.demand(failure) if failure is not None else result.sample.attribution
        meter_guard = guard(context.meter)
        if failure is not None and unlimited is not None:
            whole = unlimited.finish()
            failure.overshoot = max(0, whole.absolute_peak("allocated") - (failure.limit or 0))
            attribution = whole.attribution or attribution
        elif failure is not None and replay is not None and failure.limit is not None:
            # The replay's peak is absolute (the model included): the need is what it passes the limit by.
            try:
                failure.overshoot = max(0, replay.measure({}) - failure.limit)
            except Exception:  # noqa: BLE001 - the request's shortfall then stands alone
                pass
        elif failure is not None and measure is not None and meter_guard is not None:
            measure = capture.remembering(measure)
            failure.overshoot = capture.overshoot(failure, measure, meter_guard.in_use().get(failure.device, 0))
        advice = advisor.advise(
            attribution,
            setup,
            findings.findings(setup),
            needed(result.verdict),
            knobs,
            measure,
            measured_as,
            gpus=context.gpus,
        )
        if replay is not None:
            advice.replay = self._fidelity(replay, (unlimited or measurement).finish())
        return advice

    def _run_unlimited(self, context: Context) -> Measurement | None:
        """The test's body run once more without its simulated device limit, measured with the attribution
        on (a test that registered nothing and ran out of memory under the limit): what the whole test
        needs. None where it runs out of memory for real (the device cannot hold it either); a test that
        fails otherwise still ran through, and its peak stands."""
        assert context.explaining_meter is not None
        measurement = Measurement(context.explaining_meter())
        error = self._run_body(measurement)
        measurement.finish()
        out_of_memory = error is not None and capture.find(error) is not None
        if error is not None:
            capture.drop_frames(error)
        del error
        capture.release_cached()
        return None if out_of_memory else measurement

    def _run_body(self, measurement: Measurement) -> BaseException | None:
        """Run the test's body once more in ``measurement``'s call phase, the fixtures pointed at it (their
        values are not made again); what the body raised, its frames still alive (an interrupt goes on)."""
        self._again = measurement
        try:
            with measurement.phase("call"):
                self.item.runtest()
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as error:  # noqa: BLE001 - the first run's outcome stands; this one only explains
            return error
        finally:
            self._again = None
        return None

    @staticmethod
    def _fidelity(replay: Replay, measured: Sample) -> str:
        """The replay's own peak (no lever) beside the measured one; nothing where the replay failed."""
        try:
            replayed = replay.measure({})
        except Exception as error:  # noqa: BLE001 - the levers then said why they were not replayed
            return f"the replay of this model failed ({type(error).__name__}); its levers are estimated"
        finally:
            replay.directory.cleanup()
        # Absolute, as the replay's: what was resident when the test began plus the test's own peak.
        return replay.fidelity(measured.absolute_peak("allocated"), replayed)

    def _write_snapshot(self, context: Context, measurement: Measurement) -> str:
        target = context.settings.snapshot
        if measurement.snapshot is None or target is None:
            return ""
        try:
            return str(snapshot.write(measurement.snapshot, target, self.item.nodeid))
        except OSError as exc:
            context.errors.append(f"gpumem: could not write the memory snapshot of {self.item.nodeid}: {exc}")
            return ""

    # -- teardown

    def stop(self) -> None:
        """Stop measuring (a failed setup leaves the measurement running)."""
        if self.measurement is not None:
            self.measurement.finish()
            trainer.uninstall()

    def check_leak(self, context: Context) -> None:
        """After the test's teardown: free what can be freed (pytest's hold on a failure, the fixture values,
        the allocator's cache), then judge what the test still left alive as a leak."""
        meter_guard = guard(context.meter)
        measurement, spec = self.measurement, self.spec
        if meter_guard is None or measurement is None or spec is None or spec.leak is False:
            return
        measurement.release()
        # pytest drops the fixture values right after the teardown's hooks (the fixtures are finalized by
        # now); drop them here, or a model a fixture returned would look left behind.
        funcargs = getattr(self.item, "funcargs", None)
        if isinstance(funcargs, dict):
            funcargs.clear()
        peak = largest(measurement.phases.get("call", {}), "allocated") or 0
        leak = check_leak(meter_guard.leftover(), spec.leak, peak, LEAK_FLAG)
        if leak is not None and leak.flagged:
            # Only after a full collection: what the test left may be held by cyclic garbage of objects that
            # outlived earlier tests, which the collection after every test no longer scans (see collector).
            collector.collect_all()
            leak = check_leak(meter_guard.leftover(), spec.leak, peak, LEAK_FLAG)
        self.leak = leak
        if leak is not None and leak.flagged and not (leak.failed and not context.settings.warn_only):
            self._warn(leak_message(leak))

    def _warn(self, message: str) -> None:
        """A warning attributed to the test's own line, which the warnings summary then shows."""
        path, line, _ = self.item.location
        warnings.warn_explicit(GpuMemWarning(message), GpuMemWarning, path, (line or 0) + 1)


def _setup_of(measurement: Measurement, found: Found | None, discovery: Discovery) -> TrainingSetup:
    """The test's setup: what it registered, else its own model found by ``discovery``, read live, or as it
    was at its first forwards where the test freed it (a model made in the test function is gone when the
    function returns), with what its forwards showed."""
    registration = measurement.registration
    if found is None:
        return introspect.inspect_setup(
            registration.models, registration.optimizers, registration.knobs, measurement.probe
        )
    optimizers = registration.optimizers or discovery.optimizers
    if found.model is not None:
        setup = introspect.inspect_setup([found.model], optimizers, registration.knobs, found.probe)
    else:
        setup = introspect.add_observed(replace(found.setup or TrainingSetup()), registration.knobs, found.probe)
    setup.grad_forwards = found.calls.grad_forwards
    # A forward that raised (out of memory) never reached its backward: that says nothing.
    setup.backward = found.calls.backward if not found.calls.raised else None
    return setup
