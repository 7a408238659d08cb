"""Settings, resolved once per run into a frozen dataclass.

Each setting is declared once (:data:`OPTIONS`) and becomes a command-line
option, an ini key and an environment variable with the same help text.
Precedence: command line > environment > ini > default. Command-line
defaults are ``None`` so that an unset flag never hides the ini value. A bad
value is a :class:`~pytest_gpumem.core.units.BadValue` that names the value and
the source it came from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pytest_gpumem.ci.export import Export, parse_exports
from pytest_gpumem.config.backend import BACKENDS
from pytest_gpumem.core.gpus import find_gpu
from pytest_gpumem.core.units import BadValue, Tolerance, parse_device_limit, parse_leak, parse_tolerance

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclass(frozen=True)
class Option:
    name: str  # the Settings field
    help: str
    kind: str = "string"  # string | bool | path | choice | tolerance | margin | exports | size | leak | gpu | count
    choices: tuple[str, ...] = ()
    ini: bool = True

    @property
    def flag(self) -> str:
        return "--gpumem-" + self.name.replace("_", "-")

    @property
    def ini_name(self) -> str:
        return "gpumem_" + self.name

    @property
    def env(self) -> str:
        return "GPUMEM_" + self.name.upper()


OPTIONS = (
    Option(
        "backend",
        "how memory is measured: cuda (allocator + NVML), cpu (live tensor storages), "
        "estimate (predicted for --gpumem-estimate-gpu on fake tensors, no GPU needed), "
        "or auto (cuda when a GPU is visible, else cpu). Default: auto.",
        kind="choice",
        choices=BACKENDS,
    ),
    Option(
        "estimate_gpu",
        "the GPU the estimate backend predicts for: H100, H200, A100-40GB, A100-80GB, L4, A10, T4, RTX-4090, "
        "or a size such as 24GiB; its baselines are filed under estimate:<gpu>. Default: H100.",
        kind="gpu",
    ),
    Option("baselines", "directory of baseline files. Default: baselines/ at the rootdir.", kind="path"),
    Option(
        "update_baselines",
        "record the measured peaks of tests that passed as their new baselines.",
        kind="bool",
        ini=False,
    ),
    Option(
        "tolerance",
        "allowed growth over a baseline when a test's marker sets none: a percentage, a size, "
        "or both ('2%, 1 MiB': the larger). Default: 2%.",
        kind="tolerance",
    ),
    Option("all", "measure every test, not only those with the gpumem marker or fixture.", kind="bool"),
    Option("warn_only", "report regressions and over-budget tests without failing them.", kind="bool"),
    Option(
        "model_path",
        "a local checkpoint directory that quantized_model() loads when called without an "
        "architecture: guard your real model.",
        kind="path",
    ),
    Option(
        "explain",
        "which tests the advisor explains by re-running their training step with one lever at a time "
        "(measured savings): failed (tests that fail on memory), all, or none. Default: failed.",
        kind="choice",
        choices=("failed", "all", "none"),
    ),
    Option(
        "attribute",
        "when the attribution (weights, gradients, optimizer state and activations at the peak) and the "
        "advisor's evidence (the models and optimizers a test runs) are recorded: auto (on cuda a measured test "
        "runs on the allocator's statistics alone, and one that fails on memory, regresses or improves is run "
        "once more, inside its call, with them; the report says whether that run repeated the measured peak; "
        "on cpu and estimate, whose meters track storages anyway, every test) or always (every measured test, "
        "at the tracker's cost per operator). --gpumem-explain=all and --gpumem-update-baselines imply always. "
        "Default: auto.",
        kind="choice",
        choices=("auto", "always"),
    ),
    Option(
        "device_limit",
        "run every measured test with each device capped at this size ('16 GiB'), as on a smaller GPU: "
        "through the allocator's memory fraction on cuda, by the meter on cpu. A marker's device_limit wins.",
        kind="size",
    ),
    Option(
        "leak",
        "what a measured test may leave alive after its teardown: a size, a percentage of its peak, or both "
        "('1%, 1 MiB'); more errors the test; off: no check. Default: leftovers over 1 MiB are only flagged.",
        kind="leak",
    ),
    Option(
        "snapshot",
        "write a PyTorch memory snapshot (open it at https://pytorch.org/memory_viz) of every test that "
        "regressed or went over budget into this directory, named after the test.",
        kind="path",
        ini=False,
    ),
    Option(
        "gpus_per_worker",
        "under pytest-xdist, give each worker its own N GPUs (CUDA_VISIBLE_DEVICES set in the worker before CUDA "
        "starts there); -n auto then starts one worker per N GPUs. Without --gpumem-pack, -n times N must not "
        "exceed the GPUs visible. Default: workers see every GPU.",
        kind="count",
    ),
    Option(
        "pack",
        "under pytest-xdist, let several workers share a GPU (worker K gets GPU group K mod the number of groups) "
        "and admit a test onto it only while the stored peaks of the tests there, plus each worker's measured "
        "resident memory, stay under the device's memory less --gpumem-pack-margin; tests without a baseline "
        "or marked gpumem(exclusive=True) run alone, and a test that runs out of memory beside others is "
        "retried alone.",
        kind="bool",
    ),
    Option(
        "pack_margin",
        "memory kept free on every device when packing: a percentage of the device (under 100%), a size, or both "
        "('10%, 4 GiB': the larger). Default: 10%.",
        kind="margin",
    ),
    Option(
        "pack_capacity",
        "the memory of each device when packing ('80 GiB'). Default: the device's total memory (NVML), or the "
        "machine's RAM on the cpu backend.",
        kind="size",
    ),
    Option("json", "write the full results as JSON to this path.", kind="path", ini=False),
    Option(
        "markdown",
        "write the results as a Markdown table to this path (also appended to $GITHUB_STEP_SUMMARY when that is set).",
        kind="path",
        ini=False,
    ),
    Option(
        "history",
        "append the run's results (one row per test and metric, with commit, branch, hardware and library "
        "versions) to this history table: Parquet if it ends in .parquet, else CSV. Needs pandas.",
        kind="path",
        ini=False,
    ),
    Option(
        "export",
        "export the results for a dashboard: bmf=PATH (Bencher Metric Format) and/or gab=PATH "
        "(github-action-benchmark customSmallerIsBetter), comma-separated.",
        kind="exports",
        ini=False,
    ),
)

OPTION = {option.name: option for option in OPTIONS}


@dataclass(frozen=True)
class Settings:
    backend: str = "auto"
    estimate_gpu: str = "H100"
    baselines: Path = Path("baselines")
    update_baselines: bool = False
    tolerance: Tolerance = Tolerance(percent=2.0)  # noqa: RUF009 - frozen, so sharing it is safe
    all: bool = False
    warn_only: bool = False
    model_path: Path | None = None
    explain: str = "failed"
    attribute: str = "auto"
    device_limit: int | None = None
    leak: Tolerance | bool | None = None  # None: flag leftovers over 1 MiB; False: no check; else a limit
    snapshot: Path | None = None
    gpus_per_worker: int | None = None
    pack: bool = False
    pack_margin: Tolerance = Tolerance(percent=10.0)  # noqa: RUF009 - frozen, so sharing it is safe
    pack_capacity: int | None = None
    json: Path | None = None
    markdown: Path | None = None
    history: Path | None = None
    export: tuple[Export, ...] = ()
    # (setting, where its value came from) for each setting not left at its default; see source()
    sources: tuple[tuple[str, str], ...] = field(default=(), compare=False)

    def source(self, name: str) -> str:
        """Where setting ``name`` came from, for an error found after resolving (a baselines directory that
        is a file): its option, environment variable or ini key, or ``--gpumem-... (default)``."""
        found = dict(self.sources).get(name)
        return found if found is not None else f"{OPTION[name].flag} (default)"


def add_options(parser: Any) -> None:
    """Register every option (and its ini twin) with a pytest parser."""
    group = parser.getgroup("gpumem", "GPU memory budgets and baselines (pytest-gpumem)")
    for option in OPTIONS:
        # argparse formats help with %, so a literal percent sign is written %%.
        kwargs: dict[str, Any] = {
            "dest": "gpumem_" + option.name,
            "default": None,
            "help": option.help.replace("%", "%%"),
        }
        if option.kind == "bool":
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = "|".join(option.choices) if option.choices else option.kind.upper()
        group.addoption(option.flag, **kwargs)
        if option.ini:
            parser.addini(option.ini_name, option.help + f" Environment: {option.env}.", type="string", default="")


def resolve(config: Any) -> Settings:
    """Settings from a pytest config; raises BadValue naming the bad value and its source."""
    values: dict[str, Any] = {}
    sources: list[tuple[str, str]] = []
    for option in OPTIONS:
        found = _raw(config, option)
        if found is not None:
            values[option.name] = _convert(option, *found, base=_base_dir(config, found[1]))
            sources.append((option.name, found[1]))
    values.setdefault("baselines", Path(config.rootpath) / "baselines")
    return Settings(**values, sources=tuple(sources))


def _raw(config: Any, option: Option) -> tuple[Any, str] | None:
    cli = config.getoption("gpumem_" + option.name)
    if cli is not None:
        return cli, option.flag
    env = os.environ.get(option.env)
    if env:
        return env, f"environment variable {option.env}"
    if option.ini:
        ini = config.getini(option.ini_name)
        if ini:
            return ini, f"ini option {option.ini_name}"
    return None


def _base_dir(config: Any, source: str) -> Path:
    """Relative paths from an ini file are relative to it; all others to the working directory."""
    if source.startswith("ini") and config.inipath is not None:
        return Path(config.inipath).parent
    return Path(config.invocation_params.dir)


def _convert(option: Option, value: Any, source: str, base: Path) -> Any:
    if option.kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise BadValue(f"{source}: {value!r} is not a boolean; use true or false")
    if option.kind == "choice":
        if value not in option.choices:
            raise BadValue(f"{source}: unknown {option.name} {value!r}; choose one of {', '.join(option.choices)}")
        return value
    if option.kind == "tolerance":
        return parse_tolerance(value, source)
    if option.kind == "margin":
        return parse_margin(value, source)
    if option.kind == "gpu":
        return find_gpu(str(value), source).name
    if option.kind == "path":
        return base / expand_user(str(value), source)
    if option.kind == "exports":
        return parse_exports(value, source, base)
    if option.kind == "size":
        return parse_device_limit(value, source)
    if option.kind == "leak":
        return parse_leak(value, source)
    if option.kind == "count":
        text = str(value).strip()
        if not re.fullmatch(r"[0-9]+", text) or int(text) < 1:  # isdigit() would take '²', which int() refuses
            raise BadValue(f"{source}: {value!r} is not a whole number of GPUs (1 or more)")
        return int(text)
    return value


def parse_margin(value: object, where: str) -> Tolerance:
    """The packing margin: a tolerance whose percentage is of the device, so under 100% (at 100% nothing fits)."""
    margin = parse_tolerance(value, where)
    if margin.percent >= 100:
        raise BadValue(f"{where}: {value!r} would keep the whole device free; a margin's percentage is under 100%")
    return margin


def expand_user(text: str, where: str) -> Path:
    """``text`` as a path, ``~`` expanded; BadValue naming ``where`` for a ``~user`` that does not exist."""
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib's answer to an unknown ~user
        raise BadValue(f"{where}: {text!r}: cannot expand ~ (no such user, or no home directory)") from None
