"""Fixtures: ``gpumem`` (the test's measurement), and real models to measure:
``quantized_model``, ``lora`` and ``train_step``."""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import pytest

from pytest_gpumem.core.sample import Fit
from pytest_gpumem.estimate import engine
from pytest_gpumem.measure import ranks
from pytest_gpumem.measure.measurement import KNOBS, Measurement
from pytest_gpumem.models import loading, presets, training
from pytest_gpumem.oom.fit import fit_in_test
from pytest_gpumem.stash import MEASURED, settings_of


class GpuMem:
    """What a test sees of its own measurement: ``measurement``, or the one a callable says is running now
    (a test run again to explain it has a second measurement)."""

    def __init__(self, measurement: Measurement | Callable[[], Measurement | None]) -> None:
        self._source = measurement

    @property
    def _measurement(self) -> Measurement:
        if isinstance(self._source, Measurement):
            return self._source
        current = self._source()
        assert current is not None, "gpumem: the test's measurement has ended"
        return current

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Record the peak of the enclosed block as the named phase (shown in every report)."""
        if not isinstance(name, str) or not name or name in ("setup", "call"):
            raise ValueError(f"gpumem.phase: {name!r} is not a phase name; use a non-empty name other than setup/call")
        with self._measurement.phase(name):
            yield

    def peak(self, metric: str = "allocated", phase: str | None = None) -> int:
        """The peak of ``metric`` so far, of the test or of one named ``phase``, in bytes above what was
        resident before the test began."""
        return self._measurement.peak(metric, phase)

    def register(
        self, model: Any = None, optimizer: Any = None, step: Callable[..., Any] | None = None, **knobs: Any
    ) -> None:
        """Show the advisor a training setup the fixtures did not build.

        ``model`` and ``optimizer`` are inspected (mode, checkpointing, dtypes,
        quantization, LoRA, optimizer kind). ``step``, called with knobs as
        keyword arguments (``batch``, ``seq``, ``accumulation``, ``steps``,
        ``gradient_checkpointing``, ``autocast``, ``optimizer``: those it
        accepts), runs one training step; with it, the advisor measures what
        each lever saves by running it again with one knob changed. ``knobs``
        are the values the test ran with, e.g. ``batch=4, seq=1024``. A string
        ``optimizer`` is that knob (``optimizer="adamw"``: the step makes its own
        optimizer of that kind), not an optimizer to inspect.
        """
        if isinstance(optimizer, str):  # the knob shares its name with the optimizer object
            knobs["optimizer"] = optimizer
            optimizer = None
        unknown = sorted(set(knobs) - set(KNOBS))
        if unknown:
            raise ValueError(f"gpumem.register: unknown knob {unknown[0]!r}; known knobs: {', '.join(KNOBS)}")
        if step is not None and not callable(step):
            raise ValueError(f"gpumem.register: step must be callable, got {step!r}")
        registration = self._measurement.registration
        if model is not None:
            self._measurement.register_model(model)
        if optimizer is not None:
            registration.add_optimizer(optimizer)
        if step is not None:
            registration.step = step
        registration.knobs.update(knobs)

    def max_fit(self, step: Callable[[int], Any], start: int, *, floor: int = 1, knob: str = "batch") -> Fit:
        """Find the largest value from ``floor`` to ``start`` for which ``step(value)`` runs without running
        out of memory: the search is the test's purpose ("the largest batch that fits in 16 GiB").

        Each run happens inside the test, under its device limit (marker or
        ``--gpumem-device-limit``; without one the device's own memory, and on the
        cpu backend nothing runs out), and is measured as part of it. Values are
        halved from ``start`` until one fits, then bisected. Returns the
        :class:`~pytest_gpumem.core.sample.Fit` (``.value``: the largest that fits, None
        if not even ``floor`` does; ``.peak``: the test's peak at it; ``.tried``),
        which every report shows; assert on it.
        """

        for name, value in (("start", start), ("floor", floor)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"gpumem.max_fit: {name} must be a positive int, got {value!r}")
        if floor > start:
            raise ValueError(f"gpumem.max_fit: floor {floor} is above start {start}")
        if not callable(step):
            raise ValueError(f"gpumem.max_fit: step must be callable with one value, got {step!r}")
        fit = fit_in_test(self._measurement, step, knob, start, floor)
        self._measurement.fits.append(fit)
        return fit

    def spawn(self, fn: Callable[..., Any], nprocs: int, args: Sequence[Any] = (), **kwargs: Any) -> Any:
        """``torch.multiprocessing.spawn(fn, args, nprocs, **kwargs)`` with every child measured: each runs
        ``fn(rank, *args)`` with ``RANK`` and ``WORLD_SIZE`` set (where unset), and its peaks are reported as
        devices ``rank<R>:cpu`` / ``rank<R>:cuda:<i>`` of the phase open when it exits."""

        if not isinstance(nprocs, int) or isinstance(nprocs, bool) or nprocs < 1:
            raise ValueError(f"gpumem.spawn: nprocs must be a positive int, got {nprocs!r}")
        return ranks.spawn(fn, nprocs, args, **kwargs)


@pytest.fixture
def gpumem(request: pytest.FixtureRequest) -> GpuMem:
    """Measure this test (even without the marker) and open named phases: ``with gpumem.phase("forward"):``."""
    test = request.node.stash.get(MEASURED, None)
    if test is None or test.measurement is None:
        raise pytest.UsageError(f"gpumem fixture: {request.node.nodeid} is not measured (is the plugin disabled?)")
    return GpuMem(test.current)


@pytest.fixture(scope="session")
def gpumem_model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where random-weight checkpoints are kept: pytest's cache (so later runs reuse them), else a tmp dir."""
    cache = getattr(request.config, "cache", None)
    return Path(cache.mkdir("gpumem-models")) if cache is not None else tmp_path_factory.mktemp("gpumem-models")


_DEFAULT = object()


def _measurement(request: pytest.FixtureRequest) -> Measurement | None:
    """The test's measurement; None where the plugin is disabled (``-p no:gpumem``): the model fixtures
    still load and train then, unmeasured."""
    test = request.node.stash.get(MEASURED, None)
    return test.current() if test is not None else None


def _loading(measurement: Measurement | None) -> AbstractContextManager[None]:
    return measurement.stage("load") if measurement is not None else contextlib.nullcontext()


def _register(measurement: Measurement | None, model: Any) -> None:
    if measurement is not None:
        measurement.register_model(model)


@pytest.fixture
def quantized_model(gpumem: GpuMem, gpumem_model_dir: Path, request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Load a model as production code does: ``quantized_model("llama", size="tiny", quant="nf4")``.

    Arguments: ``arch`` (llama, mistral, qwen2), ``size`` (tiny, or a published
    shape: see ``pytest_gpumem.models.loading.PRESETS``), ``quant`` (nf4, fp4, int8, bf16,
    fp16, fp32), ``double_quant``, ``compute_dtype`` (bfloat16, float16, float32),
    ``path`` (a local checkpoint instead of a preset; ini ``gpumem_model_path``
    sets one for every call without ``arch``) and ``device_map`` (default: the
    current GPU, or the CPU without one). A preset's random-weight checkpoint is
    made on first use, on the GPU where there is one, in a child process, so that
    nothing of making it (not even a library's cache) is left in the measured one.
    """
    import torch

    def load(
        arch: str | None = None,
        *,
        size: str = "tiny",
        quant: str = "nf4",
        double_quant: bool = True,
        compute_dtype: str = "bfloat16",
        path: str | Path | None = None,
        device_map: Any = _DEFAULT,
    ) -> Any:
        presets.check_choice("quant", quant, presets.QUANTS)
        presets.check_choice("compute_dtype", compute_dtype, presets.COMPUTE_DTYPES)
        if path is None and arch is None:
            path = settings_of(request.config).model_path
        measurement = _measurement(request)
        if settings_of(request.config).backend == "estimate":
            # Predicted, not loaded: the model is built from its config on fake tensors, quantized as
            # from_pretrained quantizes it, and no checkpoint is made or read.

            recipe = engine.Recipe(arch=arch or "llama", size=size, config=Path(path) if path else None)
            with _loading(measurement):
                model = engine.fake_model(engine.model_config(recipe), quant, double_quant, compute_dtype)
            _register(measurement, model)
            return model
        if path is None:
            path = loading.ensure_checkpoint(gpumem_model_dir, arch or "llama", size)
        elif not Path(path, "config.json").is_file():
            raise ValueError(f"quantized_model: {str(path)!r} is not a checkpoint directory (no config.json)")
        if device_map is _DEFAULT:
            device_map = {"": torch.cuda.current_device()} if torch.cuda.is_available() else None
        with _loading(measurement):
            model = loading.load(path, quant, double_quant, compute_dtype, device_map)
        _register(measurement, model)
        return model

    return load


@pytest.fixture
def lora(request: pytest.FixtureRequest) -> Callable[..., Any]:
    """Apply LoRA through peft: ``lora(model, r=8, alpha=None, target_modules="all-linear", dropout=0.0,
    gradient_checkpointing=True)``; quantized models are prepared with ``prepare_model_for_kbit_training``."""

    @functools.wraps(loading.add_lora)
    def apply(model: Any, *args: Any, **kwargs: Any) -> Any:
        model = loading.add_lora(model, *args, **kwargs)
        _register(_measurement(request), model)
        return model

    return apply


_TRAIN_STEPS = inspect.signature(training.train_steps)


def _weak_step(model: Any) -> Callable[..., list[float]]:
    """``train_steps`` on ``model`` for the advisor's what-ifs, without keeping the model alive (see Registration)."""
    ref = weakref.ref(model)

    @functools.wraps(training.train_steps)
    def step(**knobs: Any) -> list[float]:
        target = ref()
        if target is None:
            raise ReferenceError("the model trained by train_step was freed when the test ended")
        return training.train_steps(target, **knobs)

    return step


@pytest.fixture
def train_step(gpumem: GpuMem, request: pytest.FixtureRequest) -> Callable[..., list[float]]:
    """Run real optimizer steps, each a phase of the measurement: ``train_step(model, batch=2, seq=64,
    steps=2, accumulation=1, gradient_checkpointing=None, autocast=None, optimizer="adamw")``; returns the
    losses. The advisor sees the model and these knobs, and may run the step again with one knob changed."""

    def run(model: Any, **kwargs: Any) -> list[float]:
        measurement = _measurement(request)  # at each call: a test run again to explain it has a second one
        if measurement is None:
            return training.train_steps(model, **kwargs, phase=gpumem.phase)
        bound = _TRAIN_STEPS.bind(model, **kwargs)
        bound.apply_defaults()
        knobs = {name: value for name, value in bound.arguments.items() if name in KNOBS}
        if knobs.get("gradient_checkpointing") is None:
            knobs["gradient_checkpointing"] = loading.gradient_checkpointing_enabled(model)
        measurement.register_model(model)
        registration = measurement.registration
        registration.step = _weak_step(model)
        registration.knobs.update(knobs)
        return training.train_steps(model, **kwargs, phase=gpumem.phase)

    return run
