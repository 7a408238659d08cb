"""What the attribution costs and how well it adds up: a QLoRA training step with and without it.

For each configuration the same model trains ``--steps`` steps inside a
measurement with the attribution off, then on, ``--rounds`` times, alternating
(the fastest of each side is kept, and the range is shown). The table gives
the step time of each side, the allocator's allocated peak, the sum of the
attributed consumers at the peak, their difference, and the breakdown.

    python benchmarks/attribution.py                       # tiny Llama on the CPU
    python benchmarks/attribution.py --sizes 1b --batch 4 --seq 1024 --out benchmarks/results/attribution-cuda.md
    python benchmarks/attribution.py --smoke               # CI: tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from results_file import apply_smoke, check_written, publish

TITLE = "What the attribution costs, and how well its consumers add up to the allocator's peak"
SMOKE = {"sizes": "tiny", "batch": 2, "seq": 32, "steps": 1, "rounds": 1, "backend": "cpu"}
GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny", help="comma-separated Llama sizes (default: tiny)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2, help="alternating off/on rounds (default: 2)")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-models")
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: tiny model, CPU, one step, a temporary --out")
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, "attribution.md")

    import torch

    from pytest_gpumem.config.backend import create, resolve_backend
    from pytest_gpumem.measure.measurement import Measurement
    from pytest_gpumem.models import loading, training

    backend = resolve_backend(args.backend)
    device_map = {"": 0} if backend == "cuda" else None
    rows = []
    for size in args.sizes.split(","):
        path = loading.ensure_checkpoint(args.model_dir, "llama", size)
        for checkpointing in (False, True):
            model = loading.add_lora(
                loading.load(path, "nf4", True, "bfloat16", device_map), r=16, gradient_checkpointing=checkpointing
            )
            times: dict[bool, list[float]] = {False: [], True: []}
            peaks: dict[bool, int] = {}
            attribution = None
            for attribute in (False, True) * args.rounds:
                measurement = Measurement(create(backend, attribute=attribute))
                measurement.enter("call")
                if backend == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                training.train_steps(model, batch=args.batch, seq=args.seq, steps=args.steps)
                if backend == "cuda":
                    torch.cuda.synchronize()
                times[attribute].append((time.perf_counter() - start) / args.steps)
                measurement.exit("call")
                sample = measurement.finish()
                peaks[attribute] = max(sample.phases["call"]["allocated"].values())
                attribution = sample.attribution or attribution
            if attribution is None:
                raise SystemExit(f"{backend}: the meter kept no attribution")
            peak = attribution.peak
            off, on = min(times[False]), min(times[True])
            rows.append(
                [
                    f"{size} nf4 r16 b{args.batch}x{args.seq} {'GC' if checkpointing else 'no GC'}",
                    f"{off * 1000:.0f} (slowest {max(times[False]) * 1000:.0f})",
                    f"{on * 1000:.0f} (slowest {max(times[True]) * 1000:.0f})",
                    f"{on / off:.2f}",
                    f"{peaks[True] / GIB:.3f}",
                    f"{peak.total / GIB:.3f}",
                    f"{100 * (peak.total - peaks[True]) / peaks[True]:+.2f}%",
                    f"{attribution.stage} ({attribution.module})",
                    " / ".join(f"{getattr(peak, n) / GIB:.3f}" for n in ("weights", "gradients", "optimizer"))
                    + f" / {peak.activations / GIB:.3f} ({peak.layer_activations / GIB:.3f} in layers)",
                ]
            )
            del model
    columns = [
        "configuration",
        "step ms, attribution off",
        "step ms, attribution on",
        "ratio of fastest",
        "allocator peak GiB",
        "attributed GiB",
        "difference",
        "peak at",
        "weights / gradients / optimizer / activations GiB",
    ]
    lines = [
        f"{backend} backend; nf4 with double quantization, LoRA r16 on all linear layers, AdamW; "
        f"steps a run: {args.steps}; alternating rounds of attribution off and on: {args.rounds}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
        "The model is loaded once per configuration; weights are resident before each measurement, "
        "so they are not part of the measured peak.",
    ]
    publish("\n".join(lines), args.out, TITLE)
    if args.smoke:
        check_written(args.out, TITLE)


if __name__ == "__main__":
    main()
