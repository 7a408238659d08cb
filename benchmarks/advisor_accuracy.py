"""How close the advisor's estimates come to what its levers really save.

A configuration, as a QLoRA recipe sets it up: a Llama-shaped model with
random weights, nf4 with double quantization, LoRA on all linear layers,
AdamW, ``--steps`` steps, with or without gradient checkpointing. It runs for
real inside a measurement, registered as a user's own test registers its
step (``gpumem.register(model=..., step=..., batch=..., ...)``), so that the
attribution is taken; the advisor then estimates every lever from it, and
measures the levers that are knobs of the step by running the step again
with the knob turned. The rank lever is not a knob: it is measured by running
the whole configuration again with half the rank (a separate model load).
Each table gives every lever's estimate, its measurement and the error of the
estimate (|estimated - measured| / measured).

    python benchmarks/advisor_accuracy.py --backend cpu                      # tiny, batch 4 x seq 64
    python benchmarks/advisor_accuracy.py --size 1b --checkpointing off,on \\
        --out benchmarks/results/advisor-accuracy.md
    python benchmarks/advisor_accuracy.py --smoke                            # CI: tiny sizes, CPU, seconds
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

from results_file import apply_smoke, check_written, publish

TITLE = "Advisor accuracy: each lever's estimated saving against the saving measured by re-running the step"
GPU_DEFAULTS = {"batch": 4, "seq": 1024}
CPU_DEFAULTS = {"batch": 4, "seq": 64}
CONSUMERS = ("weights", "gradients", "optimizer", "activations")
SMOKE = {"size": "tiny", "batch": 2, "seq": 32, "steps": 1, "checkpointing": "off,on", "backend": "cpu"}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def knobs_of(args: argparse.Namespace, checkpointing: bool) -> dict[str, Any]:
    """The step's knobs, as a test would register them."""
    return {
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "accumulation": 1,
        "gradient_checkpointing": checkpointing,
        "autocast": None,
        "optimizer": "adamw",
    }


def run_configuration(path: Path, backend: str, knobs: dict[str, Any], r: int, attribute: bool) -> Any:
    """Load, prepare and train the configuration with LoRA rank ``r`` inside a measurement, registered
    through the ``gpumem`` fixture's API; returns the sample and the (finished) measurement."""
    import torch

    from pytest_gpumem.config.backend import create
    from pytest_gpumem.fixtures import GpuMem
    from pytest_gpumem.measure.measurement import Measurement
    from pytest_gpumem.models import loading, training

    device_map = {"": torch.cuda.current_device()} if backend == "cuda" else None
    measurement = Measurement(create(backend, attribute=attribute))
    gpumem = GpuMem(measurement)  # what a test's ``gpumem`` fixture is
    measurement.enter("call")
    with measurement.stage("load"):
        model = loading.load(path, "nf4", True, "bfloat16", device_map)
    model = loading.add_lora(model, r=r, gradient_checkpointing=knobs["gradient_checkpointing"])
    gpumem.register(model=model, step=functools.partial(training.train_steps, model), **knobs)
    training.train_steps(model, **knobs, phase=measurement.phase)
    measurement.exit("call")
    return measurement.finish(), measurement


def error_percent(estimated: int | None, measured: int | None) -> str:
    if estimated is None or measured is None or measured <= 0:
        return "-"
    return f"{abs(estimated - measured) / measured:.1%}"


def accuracy(path: Path, backend: str, args: argparse.Namespace, checkpointing: bool) -> list[str]:
    """One configuration's lines: what it is, its peak, the table of levers and their bases."""
    import torch

    from pytest_gpumem.advise import advisor, findings, whatif
    from pytest_gpumem.config.backend import create
    from pytest_gpumem.core.units import format_bytes
    from pytest_gpumem.measure import introspect

    knobs = knobs_of(args, checkpointing)
    configuration = (
        f"{args.arch} {args.size}, nf4 + double quant, LoRA r{args.r} all-linear, batch {args.batch} x seq "
        f"{args.seq}, {'' if checkpointing else 'no '}checkpointing, AdamW, steps {args.steps} ({backend})"
    )
    print(configuration, file=sys.stderr)
    sample, measurement = run_configuration(path, backend, knobs, args.r, attribute=True)
    attribution = sample.attribution
    registration = measurement.registration
    setup = introspect.inspect_setup(
        registration.models, registration.optimizers, registration.knobs, measurement.probe
    )
    peak = sample.value("allocated") or 0
    measure = whatif.make_measure(registration, lambda: create(backend, attribute=False))
    advice = advisor.advise(attribution, setup, findings.findings(setup), None, registration.knobs, measure)
    rows = [
        (lever.key, lever.action, lever.estimated, lever.saving if lever.source == "measured" else None, lever.basis)
        for lever in advice.levers
    ]
    del measurement, registration, measure, setup
    _free()
    if any(key == "rank" for key, *_ in rows):
        half, _ = run_configuration(path, backend, knobs, args.r // 2, attribute=False)
        measured = peak - (half.value("allocated") or 0)
        rows = [(k, a, e, measured if k == "rank" else m, b) for k, a, e, m, b in rows]
        del half
        _free()

    short = f"{args.size} b{args.batch}x{args.seq} r{args.r}{' gc' if checkpointing else ''}"
    lines = [
        f"## {short}",
        "",
        f"Configuration: {configuration}. Peak allocated {format_bytes(peak)}"
        + (
            ": "
            + ", ".join(f"{name} {format_bytes(getattr(attribution.peak, name))}" for name in CONSUMERS)
            + f" ({format_bytes(attribution.peak.layer_activations)} of them in the decoder layers)"
            if attribution
            else ", no attribution (modelled from the model's shape)"
        )
        + f"; torch {torch.__version__}.",
        "",
        "| configuration | lever | action | estimated | measured | error |",
        "|---|---|---|---:|---:|---:|",
    ]
    for key, action, estimated, measured, _basis in rows:
        lines.append(
            f"| {short} | {key} | {action} | {format_bytes(estimated)} | {format_bytes(measured)} "
            f"| {error_percent(estimated, measured)} |"
        )
    lines += ["", "Bases:", ""] + [f"- {key}: {basis}" for key, _a, _e, _m, basis in rows] + [""]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama", help="preset architecture (default: llama)")
    parser.add_argument("--size", default="tiny", help="preset size: tiny, 1b, 3b, 8b (default: tiny)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default: 4)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 1024 on cuda, 64 on cpu)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16; the rank lever runs r/2)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument(
        "--checkpointing",
        default="off",
        help="gradient checkpointing of each configuration, in order: off, on, or off,on (default: off)",
    )
    parser.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-models")
    parser.add_argument("--out", type=Path, default=None, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: tiny model, CPU, one step, a temporary --out")
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, "advisor-accuracy.md")
    settings = [part.strip() for part in args.checkpointing.split(",")]
    if not settings or any(part not in ("off", "on") for part in settings):
        parser.error(f"--checkpointing {args.checkpointing!r}: give off, on, or off,on")

    from pytest_gpumem.config.backend import resolve_backend
    from pytest_gpumem.models import loading

    backend = resolve_backend(args.backend)
    defaults = GPU_DEFAULTS if backend == "cuda" else CPU_DEFAULTS
    args.batch = args.batch or defaults["batch"]
    args.seq = args.seq or defaults["seq"]
    args.model_dir.mkdir(parents=True, exist_ok=True)
    path = loading.ensure_checkpoint(args.model_dir, args.arch, args.size)
    lines = [
        "Every configuration runs for real inside a measurement; each lever that is a knob of the step is "
        "measured by running the step again with that knob turned, the rank lever by running the configuration "
        "again at half the rank. Error: |estimated - measured| / measured.",
        "",
    ]
    for setting in settings:
        lines += accuracy(path, backend, args, checkpointing=setting == "on")
    publish("\n".join(lines), args.out, TITLE)
    if args.smoke:
        check_written(args.out, TITLE)


if __name__ == "__main__":
    main()
