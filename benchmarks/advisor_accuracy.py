"""How close the advisor's estimates come to what its levers really save.

One configuration, as a QLoRA recipe sets it up: a Llama-shaped model with
random weights, nf4 with double quantization, LoRA on all linear layers, no
gradient checkpointing, AdamW, two steps. It runs for real inside a
measurement, so that the attribution is taken; the advisor then estimates
every lever from it, and measures the levers that are knobs of the step by
running the step again with the knob turned. The rank lever is not a knob:
it is measured by running the whole configuration again with half the rank
(a separate model load). The table gives each lever's estimate, its
measurement and the error of the estimate (|estimated - measured| / measured).

    python benchmarks/advisor_accuracy.py --backend cpu                      # tiny, batch 4 x seq 64
    python benchmarks/advisor_accuracy.py --size 8b --out benchmarks/results/advisor-accuracy.md
"""

from __future__ import annotations

import argparse
import functools
import gc
import sys
import tempfile
from pathlib import Path
from typing import Any

GPU_DEFAULTS = {"batch": 4, "seq": 1024}
CPU_DEFAULTS = {"batch": 4, "seq": 64}


def _free() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_configuration(path: Path, backend: str, args: argparse.Namespace, r: int, attribute: bool) -> Any:
    """Load, prepare and train the configuration with LoRA rank ``r`` inside a measurement; returns its
    sample, the measurement (finished) and the model."""
    import torch

    from pytest_gpumem import meters, models, training
    from pytest_gpumem.measurement import Measurement

    device_map = {"": torch.cuda.current_device()} if backend == "cuda" else None
    measurement = Measurement(meters.create(backend, attribute=attribute))
    measurement.enter("call")
    with measurement.stage("load"):
        model = models.load(path, "nf4", True, "bfloat16", device_map)
    model = models.add_lora(model, r=r, gradient_checkpointing=args.checkpointing)
    measurement.register_model(model)
    knobs = knobs_of(args)
    training.train_steps(model, **knobs, phase=measurement.phase)
    measurement.exit("call")
    sample = measurement.finish()
    return sample, measurement, model


def knobs_of(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "accumulation": 1,
        "gradient_checkpointing": args.checkpointing,
        "autocast": None,
        "optimizer": "adamw",
    }


def error_percent(estimated: int | None, measured: int | None) -> str:
    if estimated is None or measured is None or measured <= 0:
        return "-"
    return f"{abs(estimated - measured) / measured:.1%}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="llama", help="preset architecture (default: llama)")
    parser.add_argument("--size", default="tiny", help="preset size: tiny, 1b, 3b, 8b (default: tiny)")
    parser.add_argument("--batch", type=int, default=None, help="per-device batch (default: 4)")
    parser.add_argument("--seq", type=int, default=None, help="sequence length (default: 1024 on cuda, 64 on cpu)")
    parser.add_argument("--r", type=int, default=16, help="LoRA rank (default: 16; the rank lever runs r/2)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--checkpointing", action="store_true", help="with gradient checkpointing (default: off)")
    parser.add_argument("--backend", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-models")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown table here")
    args = parser.parse_args()

    import torch

    from pytest_gpumem import advisor, introspect, meters, models, training, whatif
    from pytest_gpumem.measurement import Registration
    from pytest_gpumem.units import format_bytes

    backend = meters.resolve_backend(args.backend)
    defaults = GPU_DEFAULTS if backend == "cuda" else CPU_DEFAULTS
    args.batch = args.batch or defaults["batch"]
    args.seq = args.seq or defaults["seq"]
    args.model_dir.mkdir(parents=True, exist_ok=True)
    path = models.ensure_checkpoint(args.model_dir, args.arch, args.size)
    configuration = (
        f"{args.arch} {args.size}, nf4 + double quant, LoRA r{args.r} all-linear, batch {args.batch} x seq "
        f"{args.seq}, {'' if args.checkpointing else 'no '}checkpointing, AdamW, {args.steps} steps ({backend})"
    )
    print(configuration, file=sys.stderr)

    sample, measurement, model = run_configuration(path, backend, args, args.r, attribute=True)
    attribution = sample.attribution
    knobs = knobs_of(args)
    setup = introspect.inspect_setup([model], [], knobs, measurement.probe)
    findings = introspect.findings(setup)
    peak = sample.value("allocated") or 0
    if attribution is None:
        print(
            "no attribution was taken (the meter kept no storage tracker): the estimates below are modelled "
            "from the model's shape alone",
            file=sys.stderr,
        )
    else:
        print(
            f"peak {format_bytes(peak)}: {attribution.peak} in {attribution.stage} ({attribution.phase})",
            file=sys.stderr,
        )
    registration = Registration(models=[model], step=functools.partial(training.train_steps, model), knobs=knobs)
    measure = whatif.make_measure(registration, lambda: meters.create(backend, attribute=False))
    advice = advisor.advise(attribution, setup, findings, None, knobs, measure)
    rows = []
    for lever in advice.levers:
        measured = lever.saving if lever.source == "measured" else None
        rows.append((lever.key, lever.action, lever.estimated, measured, lever.basis))

    rank = next((lever for lever in advice.levers if lever.key == "rank"), None)
    if rank is not None:
        del model, measurement, registration, measure
        _free()
        half, _, _ = run_configuration(path, backend, args, args.r // 2, attribute=False)
        measured = peak - (half.value("allocated") or 0)
        rows = [
            (key, action, est, measured if key == "rank" else meas, basis) for key, action, est, meas, basis in rows
        ]
        del half
        _free()

    lines = [
        f"Configuration: {configuration}. Peak allocated {format_bytes(peak)}"
        + (f", {attribution.peak}" if attribution else ", no attribution")
        + f"; torch {torch.__version__}.",
        "",
        "| configuration | lever | action | estimated | measured | error |",
        "|---|---|---|---:|---:|---:|",
    ]
    short = f"{args.size} b{args.batch}x{args.seq} r{args.r}{' gc' if args.checkpointing else ''}"
    for key, action, estimated, measured, _basis in rows:
        lines.append(
            f"| {short} | {key} | {action} | {format_bytes(estimated)} | {format_bytes(measured)} "
            f"| {error_percent(estimated, measured)} |"
        )
    lines += ["", "Bases:", ""] + [f"- {key}: {basis}" for key, _a, _e, _m, basis in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
