"""The ``gpumem`` command: work with result files and the history without running the tests again.

- ``gpumem compare A.json B.json``: judge B's results against A's, as if A's
  were B's baselines (main against a pull request, say); exits 1 on a
  regression, an over-budget or an out-of-memory test.
- ``gpumem merge SHARD.json ...``: the result files of a sharded run merged
  into the document one unsharded run writes.
- ``gpumem report --history PATH``: per-test trends, the commits where memory
  stepped, and a plot (PNG and HTML).
- ``gpumem estimate --arch llama --size 8b ... --gpu H100``: one QLoRA training
  step predicted without a GPU (see :mod:`pytest_gpumem.estimate.engine`); exits 1
  when it does not fit the GPU, 4 when it fell back to the analytic formula.

Each subcommand is one function registered with :func:`command`, which also
declares its arguments; adding one is writing that function. Bad input is a
one-line error naming the value and the option or file it came from, and exit
status 2 (see :data:`EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NoReturn

from pytest_gpumem.ci.export import parse_exports
from pytest_gpumem.ci.export import render as render_export
from pytest_gpumem.ci.history import STEP_TOLERANCE, SUSTAIN, HistoryError
from pytest_gpumem.ci.merge import MergeError, merge
from pytest_gpumem.core.atomic import write_atomic
from pytest_gpumem.core.judge import judge
from pytest_gpumem.core.sample import Baseline, Spec, TestResult
from pytest_gpumem.core.units import BadValue, Tolerance, parse_tolerance
from pytest_gpumem.report import json_report, markdown
from pytest_gpumem.report.terminal import summary_lines

DEFAULT_TOLERANCE = Tolerance(percent=2.0)
"""What the plugin allows when neither a marker nor ``--gpumem-tolerance`` says otherwise."""

ESTIMATE_FELL_BACK = 4
"""``gpumem estimate``'s exit status when the fake run failed and the estimate is the analytic formula's."""

EXIT_CODES = {
    0: "success: compare found no memory failure, estimate fits, merge and report done",
    1: "compare: a regression, an over-budget or an out-of-memory test; estimate: it does not fit the GPU",
    2: "bad input: an unknown option or value, a file that cannot be read or is not what it should be, "
    "a --branch with no runs in the history (one line on stderr, naming the value and where it came from)",
    ESTIMATE_FELL_BACK: "estimate: the fake run failed, and every figure (the levers' too) comes from the "
    "analytic formula",
}
"""What ``gpumem`` exits with."""

COMPUTE_DTYPES = ("bfloat16", "float16", "float32")
"""The compute dtypes bitsandbytes' quantized layers take."""


class CliError(Exception):
    """Bad input to a subcommand; the message names the value and where it came from."""


@dataclass(frozen=True)
class Arg:
    """One ``add_argument`` call: its flags (or positional name) and keyword arguments."""

    flags: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)


def arg(*flags: str, **options: Any) -> Arg:
    return Arg(flags, options)


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    args: tuple[Arg, ...]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}
"""The subcommands, by name, in the order they were registered."""


def command(name: str, help: str, *args: Arg) -> Callable[[Callable[[argparse.Namespace], int]], Any]:
    """Register the decorated function as subcommand ``name``; it returns the exit status."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = Command(name, help, args, run)
        return run

    return register


# -- shared helpers


def _load(path: str) -> tuple[dict[str, Any], list[TestResult]]:
    try:
        return json_report.load(path)
    except OSError as exc:
        raise CliError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except ValueError as exc:  # json_report.load names the file
        raise CliError(str(exc)) from None


def _tolerance(text: str | None, where: str) -> Tolerance | None:
    return None if text is None else parse_tolerance(text, where)


def _write(path: str | os.PathLike[str], text: str) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, text)


def _print(lines: Sequence[str]) -> None:
    sys.stdout.write("".join(line + "\n" for line in lines))


def _write_reports(args: argparse.Namespace, results: list[TestResult], environment: dict[str, Any]) -> None:
    """The optional ``--json`` and ``--markdown`` outputs, as the plugin writes them."""
    if getattr(args, "json", None):
        _write(args.json, json_report.dumps(json_report.build(results, environment)))
        print(f"wrote {args.json}")
    if getattr(args, "markdown", None):
        _write(args.markdown, markdown.render(results, environment))
        print(f"wrote {args.markdown}")


JSON_ARG = arg("--json", metavar="PATH", help="also write the results as a pytest-gpumem JSON document")
MARKDOWN_ARG = arg("--markdown", metavar="PATH", help="also write the Markdown report (for a pull-request comment)")


# -- compare


def compare_results(
    base: list[TestResult],
    base_environment: dict[str, Any],
    head: list[TestResult],
    head_environment: dict[str, Any],
    *,
    tolerance: Tolerance | None = None,
    base_name: str = "A",
    head_name: str = "B",
    explain: str = "failed",
) -> list[TestResult]:
    """``head``'s results judged against ``base``'s, with the plugin's judge.

    Each head test keeps its own metric and budget; its tolerance is
    ``tolerance`` if given, else the one it was judged with (its marker's or the
    run's), else the plugin's default of 2%. The base result becomes the
    baseline, with the base run's software, so library changes are named as
    the plugin names them. A base result from other hardware is not compared
    (the test is ``new``, and the other key is named); an out-of-memory result
    keeps its verdict. The advisor's explanation recorded in B is kept for the
    tests this comparison fails (``explain="failed"``) or for all (``"all"``):
    a test B's own run flagged but judged ok here is not explained.
    """
    by_nodeid = {r.nodeid: r for r in base}
    base_software = base_environment.get("software") or {}
    head_software = head_environment.get("software") or {}
    judged = []
    for result in head:
        if result.verdict.status == "oom":
            judged.append(result)
            continue
        old = by_nodeid.get(result.nodeid)
        baseline = None
        other_hardware: list[str] = []
        if old is not None and old.hardware == result.hardware:
            baseline = Baseline(
                metrics=old.sample.phases.get("call", {}),
                phases=old.sample.phases,
                software=dict(base_software),
                recorded=base_name,
                backend=old.sample.backend,
                attribution=old.sample.attribution,
            )
        elif old is not None:
            other_hardware = [old.hardware]
        own = result.verdict.tolerance
        per_device = tuple((row.device, row.budget) for row in result.verdict.devices if row.budget is not None)
        spec = Spec(
            metric=result.verdict.metric,
            budget=None if result.verdict.devices else result.verdict.budget,
            budget_per_device=per_device,  # the budgets each device was judged with
            tolerance=tolerance
            or (parse_tolerance(own, f"{head_name}: tolerance of {result.nodeid}") if own else DEFAULT_TOLERANCE),
        )
        verdict = judge(result.sample, spec, baseline, dict(head_software), other_hardware=other_hardware)
        advice = result.advice if explain == "all" or verdict.failed else None
        judged.append(replace(result, verdict=verdict, baseline=baseline, advice=advice))
    return judged


def _listing(nodeids: Sequence[str], limit: int = 10) -> str:
    shown = ", ".join(nodeids[:limit])
    return shown + (f", and {len(nodeids) - limit} more" if len(nodeids) > limit else "")


@command(
    "compare",
    "judge the results of B.json against those of A.json (A as the baselines) without running anything; "
    "exit 1 on a regression, over-budget or out-of-memory test",
    arg("a", metavar="A.json", help="the reference results (e.g. the target branch's)"),
    arg("b", metavar="B.json", help="the results to judge (e.g. the pull request's)"),
    arg(
        "--tolerance",
        metavar="TOL",
        help="allowed growth for every test ('2%%', '256 MiB', '2%%, 1 MiB'); "
        "default: the tolerance each test was judged with in B, else 2%%",
    ),
    arg(
        "--explain",
        choices=("failed", "all"),
        default="failed",
        help="whose advice B recorded to print: the tests this comparison fails (default), or all",
    ),
    JSON_ARG,
    MARKDOWN_ARG,
)
def compare(args: argparse.Namespace) -> int:
    base_environment, base = _load(args.a)
    head_environment, head = _load(args.b)
    tolerance = _tolerance(args.tolerance, "--tolerance")
    results = compare_results(
        base,
        base_environment,
        head,
        head_environment,
        tolerance=tolerance,
        base_name=args.a,
        head_name=args.b,
        explain=args.explain,
    )
    lines = summary_lines(results)
    head_ids = {r.nodeid for r in head}
    base_ids = {r.nodeid for r in base}
    missing = sorted(base_ids - head_ids)
    new = sorted(head_ids - base_ids)
    if missing:
        lines.append(f"missing in {args.b}: {len(missing)} tests of {args.a} did not run: {_listing(missing)}")
    if new:
        lines.append(f"new in {args.b}: {len(new)} tests not in {args.a}: {_listing(new)}")
    _print(lines)
    _write_reports(args, results, head_environment)
    return 1 if any(r.verdict.failed for r in results) else 0


# -- merge


@command(
    "merge",
    "merge the result files of a sharded run (a CI job matrix, pytest-xdist workers) into one report, "
    "the same as one unsharded run writes",
    arg("files", metavar="SHARD.json", nargs="+", help="the shards' --gpumem-json files"),
    arg("-o", "--json", metavar="PATH", help="write the merged results as a pytest-gpumem JSON document"),
    MARKDOWN_ARG,
    arg(
        "--export",
        metavar="FORMAT=PATH",
        action="append",
        default=[],
        help="also export the merged results: bmf=PATH (Bencher) or gab=PATH (github-action-benchmark); repeatable",
    ),
    arg("--history", metavar="PATH", help="append the merged results to this history table (.csv or .parquet)"),
)
def merge_command(args: argparse.Namespace) -> int:
    exports = [e for value in args.export for e in parse_exports(value, "--export")]
    environment, results = merge([(path, *_load(path)) for path in args.files])
    _print(summary_lines(results))
    _write_reports(args, results, environment)
    for export in exports:
        _write(export.path, render_export(export.format, results))
        print(f"wrote {export.path} ({export.format})")
    if args.history:
        from pytest_gpumem.ci import history

        added = history.append(args.history, results, environment.get("software") or {})
        print(f"history: {args.history}: {added} rows added")
    return 0


# -- report


@command(
    "report",
    "per-test trends and the commits where memory stepped, from a history table; writes history.png and history.html",
    arg("--history", metavar="PATH", required=True, help="the history table (--gpumem-history) to read"),
    arg("--out", metavar="DIR", default=".", help="where to write history.png and history.html (default: .)"),
    arg("--branch", metavar="NAME", help="only the runs of this branch (default: all)"),
    arg(
        "--tolerance",
        metavar="TOL",
        help=f"the smallest change that counts as a step (default: '{STEP_TOLERANCE}': the larger of the two)".replace(
            "%", "%%"
        ),
    ),
    arg(
        "--sustain",
        metavar="N",
        type=int,
        default=SUSTAIN,
        help=f"runs a new level must hold to count as a step (default: {SUSTAIN})",
    ),
    arg("--no-plot", action="store_true", help="print the trends and steps only"),
)
def report(args: argparse.Namespace) -> int:
    from pytest_gpumem.ci import history
    from pytest_gpumem.report import history as history_report

    tolerance = _tolerance(args.tolerance, "--tolerance") or STEP_TOLERANCE
    if args.sustain < 1:
        raise CliError(f"--sustain: {args.sustain} is not a number of runs; use 1 or more")
    frame = history.load(args.history)
    all_series = history.series(frame, branch=args.branch)
    if args.branch is not None and not all_series:
        known = sorted(set(frame["branch"]) - {""})
        raise CliError(
            f"--branch: no runs of branch {args.branch!r} in {args.history} "
            f"({'its branches: ' + _listing([repr(b) for b in known]) if known else 'it records no branch'})"
        )
    trends = [history.trend(s) for s in all_series]
    steps = [step for s in all_series for step in history.steps(s, tolerance, args.sustain)]
    _print(history_report.text_lines(trends, steps))
    if not args.no_plot and all_series:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        fig = history_report.figure(all_series, steps)
        history_report.write_png(fig, out / "history.png")
        _write(out / "history.html", history_report.html_page(fig, trends, steps, str(args.history)))
        print(f"wrote {out / 'history.png'} and {out / 'history.html'}")
    return 0


# -- the entry point


# -- estimate


@command(
    "estimate",
    "predict the GPU memory of one QLoRA training step without a GPU (fake tensors): the peak, what holds "
    "it, whether it fits the GPU, and the levers that would make it fit; exit 0 if it fits, 1 if not, "
    f"{ESTIMATE_FELL_BACK} if the fake run failed and the numbers come from the analytic formula",
    arg("--arch", default="llama", help="preset architecture (llama, mistral, qwen2) or a local config.json path"),
    arg("--size", default="8b", help="preset size, e.g. 1b, 8b (ignored with a config path; default: 8b)"),
    arg("--quant", default="nf4", help="nf4, fp4, int8, or unquantized bf16/fp16/fp32 (default: nf4)"),
    arg("--no-double-quant", action="store_true", help="without double quantization of the 4-bit statistics"),
    arg("--compute-dtype", default="bfloat16", help="bitsandbytes compute dtype (default: bfloat16)"),
    arg("--lora-r", type=int, default=16, help="LoRA rank; alpha is 2r (default: 16)"),
    arg("--lora-targets", default="all-linear", help="all-linear, or comma-separated module names (q_proj,v_proj)"),
    arg("--batch", type=int, default=1, help="per-device batch size (default: 1)"),
    arg("--seq", type=int, default=2048, help="sequence length in tokens (default: 2048)"),
    arg("--gradient-checkpointing", action="store_true", help="with gradient checkpointing"),
    arg(
        "--checkpointing-variant",
        default="reentrant",
        choices=("reentrant", "non-reentrant"),
        help="with --gradient-checkpointing: reentrant (what prepare_model_for_kbit_training gives with peft's "
        'defaults) or non-reentrant (gradient_checkpointing_kwargs={"use_reentrant": False}); default: reentrant',
    ),
    arg(
        "--loop",
        default="plain",
        choices=("plain", "trainer"),
        help="plain: outputs = model(...); outputs.loss.backward(), the logits alive through backward; "
        "trainer: transformers' Trainer, which drops the outputs before backward (default: plain)",
    ),
    arg(
        "--use-cache",
        default="config",
        choices=("config", "true", "false"),
        help="model.config.use_cache: as the config has it (true for Llama, Mistral, Qwen2: without checkpointing "
        "the forward pass fills a KV cache), or set (false is what QLoRA notebooks often set; default: config)",
    ),
    arg("--optimizer", default="adamw", help="adamw, adamw8bit or paged_adamw8bit (default: adamw)"),
    arg("--gpu", default="H100", help="H100, H200, A100-40GB, A100-80GB, L4, A10, T4, RTX-4090, or a size: 16GiB"),
    arg("--no-levers", action="store_true", help="skip the levers (each is a further estimate)"),
    arg("--json", action="store_true", help="print one JSON object instead of the table"),
)
def estimate_command(args: argparse.Namespace) -> int:
    import json

    from pytest_gpumem.core.gpus import find_gpu
    from pytest_gpumem.estimate import engine
    from pytest_gpumem.models.presets import PRESETS
    from pytest_gpumem.report.estimate import lines

    gpu = find_gpu(args.gpu, "--gpu")
    config = None
    if args.arch not in PRESETS:
        if not Path(args.arch).exists():
            raise CliError(f"--arch: {args.arch!r} is neither a preset ({', '.join(PRESETS)}) nor an existing path")
        config = Path(args.arch)
    if args.compute_dtype not in COMPUTE_DTYPES:
        raise CliError(
            f"--compute-dtype: unknown dtype {args.compute_dtype!r}; choose one of {', '.join(COMPUTE_DTYPES)}"
        )
    targets = args.lora_targets
    if targets != "all-linear":
        targets = tuple(target.strip() for target in targets.split(","))
    recipe = engine.Recipe(
        arch=args.arch if config is None else "",
        size=args.size if config is None else None,
        config=config,
        quant=args.quant,
        double_quant=not args.no_double_quant,
        compute_dtype=args.compute_dtype,
        lora_r=args.lora_r,
        lora_targets=targets,
        batch=args.batch,
        seq=args.seq,
        gradient_checkpointing=args.gradient_checkpointing,
        checkpointing=args.checkpointing_variant,
        loop=args.loop,
        use_cache=None if args.use_cache == "config" else args.use_cache == "true",
        optimizer=args.optimizer,
    )
    if isinstance(targets, tuple):
        model = args.arch if config is not None else f"{args.arch} {args.size}"
        check_lora_targets(targets, engine.model_config(recipe), model, "--lora-targets")
    result = engine.estimate(recipe, gpu, advise=not args.no_levers)
    if args.json:
        print(json.dumps(result.to_dict(), sort_keys=True, indent=2))
    else:
        _print(lines(result))
    if result.method == "analytic":
        return ESTIMATE_FELL_BACK
    return 0 if result.fits else 1


def lora_layers(config: Any) -> list[str] | None:
    """The names of the layers LoRA can adapt (linear, embedding, convolution) in the causal LM of ``config``,
    built on the meta device: no weight is made, so an 8B model costs a few milliseconds. None where
    transformers cannot build it (the estimate then says why)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    adaptable = (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, Conv1D)
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_config(config)
    except Exception:  # noqa: BLE001 - any model class transformers cannot make here; the estimate reports it
        return None
    return [name for name, module in model.named_modules() if isinstance(module, adaptable)]


def check_lora_targets(targets: Sequence[str], config: Any, model: str, where: str) -> None:
    """CliError for a target that names no layer LoRA can adapt in the model of ``config``: peft would refuse
    the recipe, and an estimate without it would predict a setup that cannot run. A target matches a layer
    as peft matches it: the whole name, or its last dotted parts (``q_proj``, ``self_attn.q_proj``)."""
    layers = lora_layers(config)
    if layers is None:
        return
    for target in targets:
        if not target or not any(layer == target or layer.endswith("." + target) for layer in layers):
            kinds = sorted({layer.rsplit(".", 1)[-1] for layer in layers})
            raise CliError(
                f"{where}: {target!r} names no layer LoRA can adapt in {model}; its layers: {', '.join(kinds)}"
            )


class _Parser(argparse.ArgumentParser):
    """argparse, its errors in one line like the commands' own (the usage is in ``--help``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_FLAG_ACTIONS = ("store_true", "store_false", "store_const", "count", "help", "version")


def _attach_dash_values(argv: Sequence[str]) -> list[str]:
    """``--tolerance -5%`` as ``--tolerance=-5%`` (``-o -x`` as ``-o-x``): argparse takes a value that starts
    with ``-`` and is not a plain number for an option, and stops at "expected one argument" before the
    value reaches the option's own check, which says what is wrong with it."""
    argv = list(argv)
    start = next((i for i, token in enumerate(argv) if token in COMMANDS), None)
    if start is None:
        return argv
    args = COMMANDS[argv[start]].args
    flags = {flag for a in args for flag in a.flags} | {"-h", "--help", "--"}
    takes_value = {f for a in args if a.options.get("action") not in _FLAG_ACTIONS for f in a.flags if f[0] == "-"}
    out = argv[: start + 1]
    i = start + 1
    while i < len(argv):
        token = argv[i]
        value = argv[i + 1] if token in takes_value and i + 1 < len(argv) else None
        if value is not None and value.startswith("-") and value not in flags:
            out.append(f"{token}={value}" if token.startswith("--") else token + value)
            i += 2
        else:
            out.append(token)
            i += 1
    return out


def parser() -> argparse.ArgumentParser:
    """The ``gpumem`` argument parser, one subparser per registered command."""
    top = _Parser(prog="gpumem", description="pytest-gpumem results: compare, merge, and the history's trends.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for cmd in COMMANDS.values():
        child = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        for a in cmd.args:
            child.add_argument(*a.flags, **a.options)
        child.set_defaults(run=cmd.run)
    return top


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpumem``; returns the exit status (see :data:`EXIT_CODES`)."""
    try:
        args = parser().parse_args(_attach_dash_values(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # argparse has printed --help (0) or a usage error in one line (2)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    try:
        return int(args.run(args))
    except (CliError, BadValue, MergeError, HistoryError) as exc:
        message = str(exc)
    except OSError as exc:
        message = f"{exc.filename}: {exc.strerror}" if exc.filename else str(exc)
    print(f"gpumem {args.command}: error: {message}", file=sys.stderr)
    return 2
