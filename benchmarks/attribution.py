"""What the attribution costs and how well it adds up: a QLoRA training step with and without it.

For each configuration the same model trains ``--steps`` steps inside a
measurement with the attribution off, then on (twice each, alternating; the
faster of each side is kept). The table gives the step time of each side, the
allocator's allocated peak, the sum of the attributed consumers at the peak,
their difference, and the breakdown.

    python benchmarks/attribution.py                       # tiny Llama on the CPU
    python benchmarks/attribution.py --sizes 1b --batch 4 --seq 1024 --out benchmarks/results/attribution-cuda.md
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny", help="comma-separated Llama sizes (default: tiny)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--models", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-bench-models")
    parser.add_argument("--out", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args()

    import torch

    from pytest_gpumem import meters, models, training
    from pytest_gpumem.environment import hardware_key, software_versions
    from pytest_gpumem.measurement import Measurement

    backend = meters.resolve_backend(args.backend)
    device_map = {"": 0} if backend == "cuda" else None
    gib = 2**30
    rows = []
    for size in args.sizes.split(","):
        for checkpointing in (False, True):
            path = models.ensure_checkpoint(args.models, "llama", size)
            model = models.add_lora(
                models.load(path, "nf4", True, "bfloat16", device_map), r=16, gradient_checkpointing=checkpointing
            )
            times: dict[bool, float] = {}
            peaks: dict[bool, int] = {}
            attribution = None
            for attribute in (False, True, False, True):
                measurement = Measurement(meters.create(backend, attribute=attribute))
                measurement.enter("call")
                if backend == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                training.train_steps(model, batch=args.batch, seq=args.seq, steps=args.steps)
                if backend == "cuda":
                    torch.cuda.synchronize()
                elapsed = (time.perf_counter() - start) / args.steps
                measurement.exit("call")
                sample = measurement.finish()
                times[attribute] = min(times.get(attribute, elapsed), elapsed)
                peaks[attribute] = max(sample.phases["call"]["allocated"].values())
                attribution = sample.attribution or attribution
            assert attribution is not None
            peak = attribution.peak
            rows.append(
                [
                    f"{size} nf4 r16 b{args.batch}x{args.seq} {'GC' if checkpointing else 'no GC'}",
                    f"{times[False] * 1000:.0f}",
                    f"{times[True] * 1000:.0f}",
                    f"{times[True] / times[False]:.2f}",
                    f"{peaks[True] / gib:.3f}",
                    f"{peak.total / gib:.3f}",
                    f"{100 * (peak.total - peaks[True]) / peaks[True]:+.2f}%",
                    f"{attribution.stage} ({attribution.module})",
                    " / ".join(f"{getattr(peak, n) / gib:.3f}" for n in ("weights", "gradients", "optimizer"))
                    + f" / {peak.activations / gib:.3f} ({peak.layer_activations / gib:.3f} in layers)",
                ]
            )
            del model
    header = [
        "configuration",
        "step ms, off",
        "step ms, on",
        "ratio",
        "allocator peak GiB",
        "attributed GiB",
        "difference",
        "peak at",
        "weights / gradients / optimizer / activations GiB",
    ]
    lines = [
        f"Attribution on the {backend} backend, {hardware_key(backend)}; "
        + ", ".join(f"{k} {v}" for k, v in sorted(software_versions().items())),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(
        "The model is loaded once per configuration; weights are resident before each measurement, "
        "so they are not part of the measured peak."
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
