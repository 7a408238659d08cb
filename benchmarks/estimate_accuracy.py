"""How close the estimate backend's prediction comes to the real GPU, and what an estimate costs.

Accuracy: every configuration runs for real on the GPU and is estimated on
fake tensors, the same recipe both ways: a Llama-shaped model with random
weights loaded through ``from_pretrained`` (nf4, double quantization, bf16
compute), ``prepare_model_for_kbit_training``, LoRA r16 on all linear layers,
AdamW, a warm-up step and the measured step. The measured figure is the
allocator's allocated peak over the measured step (``max_memory_allocated``,
the model, the optimizer state and the cuBLAS workspaces included, in a
process that holds nothing else); the estimate is ``estimate.run_step``'s peak
plus the GPU's workspaces. The table gives both, and the error
(estimated - measured) / measured; reserved is compared too (modelled, not
gated).

Speed: the 8B estimate (batch 1 x seq 2048, checkpointing, the CLI's
defaults) runs in a child process on this machine's CPU; its wall time and
peak RSS are recorded.

    python benchmarks/estimate_accuracy.py --out benchmarks/results/estimate-accuracy.md       # on the GPU
    python benchmarks/estimate_accuracy.py --speed-only --out benchmarks/results/estimate-speed-cpu.md
    python benchmarks/estimate_accuracy.py --estimate-only --real REAL.json                     # re-estimate here
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

SIZES = ("1b", "8b")
SHAPES = ((1, 1024), (1, 2048), (4, 1024), (4, 2048))
GiB = 2**30


def configurations(sizes: tuple[str, ...]) -> list[dict[str, Any]]:
    return [
        {"size": size, "gc": gc_on, "batch": batch, "seq": seq}
        for size in sizes
        for gc_on in (False, True)
        for batch, seq in SHAPES
    ]


def label(config: dict[str, Any]) -> str:
    return f"llama {config['size']} b{config['batch']}x{config['seq']} {'gc' if config['gc'] else 'no gc'}"


def real_runs(configs: list[dict[str, Any]], model_dir: Path) -> dict[str, Any]:
    """Run every configuration on the GPU: the measured step's allocated and reserved peaks (absolute)."""
    import torch

    from pytest_gpumem import models, training
    from pytest_gpumem.meters.cuda import _warm_up

    _warm_up("cuda:0")
    workspace = torch.cuda.memory_allocated()
    found: dict[str, Any] = {"workspace": workspace, "device": torch.cuda.get_device_name(0), "rows": {}}
    for size in dict.fromkeys(c["size"] for c in configs):
        path = models.ensure_checkpoint(model_dir, "llama", size)
        model = models.add_lora(models.load(path, "nf4", True, "bfloat16", {"": 0}), r=16, gradient_checkpointing=False)
        resident = torch.cuda.memory_allocated()
        for config in (c for c in configs if c["size"] == size):
            peaks: dict[str, int] = {}

            @contextlib.contextmanager
            def phase(name: str, peaks: dict[str, int] = peaks) -> Iterator[None]:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                yield
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
                peaks[name + "_reserved"] = torch.cuda.max_memory_reserved()

            row: dict[str, Any] = {"resident": resident}
            try:
                training.train_steps(
                    model,
                    batch=config["batch"],
                    seq=config["seq"],
                    steps=2,
                    gradient_checkpointing=config["gc"],
                    phase=phase,
                )
                row.update(peak=peaks["step2"], reserved=peaks["step2_reserved"])
            except torch.OutOfMemoryError:
                row["oom"] = True
            gc.collect()
            torch.cuda.empty_cache()
            found["rows"][label(config)] = row
            print(label(config), row, file=sys.stderr, flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return found


def estimates(configs: list[dict[str, Any]], gpu_name: str) -> dict[str, Any]:
    """Estimate every configuration on fake tensors for ``gpu_name``."""
    from pytest_gpumem import estimate, gpus

    gpu = gpus.find_gpu(gpu_name, "--gpu")
    rows = {}
    for config in configs:
        recipe = estimate.Recipe(
            size=config["size"], batch=config["batch"], seq=config["seq"], gradient_checkpointing=config["gc"]
        )
        started = time.perf_counter()
        peak, resident, _, _ = estimate.run_step(recipe, gpu, attribute=False)
        peak += gpu.workspace
        rows[label(config)] = {
            "peak": peak,
            "reserved": gpus.reserved_bytes(peak, estimate.fragmenting(recipe)),
            "resident": resident,
            "seconds": time.perf_counter() - started,
        }
        print(label(config), rows[label(config)], file=sys.stderr, flush=True)
    return {"gpu": gpu.name, "rows": rows}


def speed(gpu_name: str) -> dict[str, Any]:
    """The 8B estimate (the CLI's default setup) in a child process: wall seconds and the child's own peak RSS
    (it reports it itself: RUSAGE_CHILDREN would also count the earlier children that loaded real models)."""
    code = (
        "import resource; from pytest_gpumem import estimate, gpus; "
        "r = estimate.Recipe(size='8b', batch=1, seq=2048, gradient_checkpointing=True); "
        f"estimate.run_step(r, gpus.find_gpu({gpu_name!r}, 'gpu'), attribute=True); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    rss = int(done.stdout.split()[-1]) * 1024  # kilobytes on Linux
    return {"seconds": wall, "rss": rss, "cpus": os.cpu_count(), "machine": platform.processor() or platform.machine()}


def error(estimated: int, measured: int) -> float:
    return (estimated - measured) / measured


def table(real: dict[str, Any], fake: dict[str, Any], software: str) -> list[str]:
    lines = [
        f"Real: {real['device']}; estimate for {fake['gpu']}; {software}. Peak allocated of the measured step "
        "(absolute: model, optimizer state and cuBLAS workspaces included); GiB = 2^30 bytes.",
        "",
        "| configuration | measured | estimated | error | reserved measured | reserved estimated | error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    errors = []
    for name, measured in real["rows"].items():
        guess = fake["rows"].get(name)
        if guess is None:
            continue
        if measured.get("oom"):
            lines.append(f"| {name} | OOM | {guess['peak'] / GiB:.3f} GiB | - | OOM | - | - |")
            continue
        e = error(guess["peak"], measured["peak"])
        errors.append(abs(e))
        reserved = measured.get("reserved") or 0
        r = f"{error(guess['reserved'], reserved):+.1%}" if reserved else "-"
        lines.append(
            f"| {name} | {measured['peak'] / GiB:.3f} GiB | {guess['peak'] / GiB:.3f} GiB | {e:+.2%} "
            f"| {f'{reserved / GiB:.3f} GiB' if reserved else '-'} | {guess['reserved'] / GiB:.3f} GiB | {r} |"
        )
    if errors:
        within3 = sum(1 for e in errors if e <= 0.03)
        lines += [
            "",
            f"Peak allocated: largest error {max(errors):.2%}; {within3} of {len(errors)} within 3%, "
            f"{sum(1 for e in errors if e <= 0.05)} within 5%.",
        ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=",".join(SIZES), help="comma-separated preset sizes (default: 1b,8b)")
    parser.add_argument("--gpu", default=None, help="the GPU to estimate for (default: the one here, else H100)")
    parser.add_argument("--real", type=Path, help="real measurements from an earlier run (JSON) instead of the GPU")
    parser.add_argument("--estimate-only", action="store_true", help="no GPU: estimate, compare with --real")
    parser.add_argument("--speed-only", action="store_true", help="only the speed of the 8B estimate")
    parser.add_argument("--json", type=Path, help="also write the raw numbers as JSON here")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-models")
    parser.add_argument("--out", type=Path, help="also write the Markdown here")
    args = parser.parse_args()

    import torch
    import transformers

    software = f"torch {torch.__version__}, transformers {transformers.__version__}"
    lines: list[str] = []
    raw: dict[str, Any] = {}
    if not args.speed_only:
        configs = configurations(tuple(args.sizes.split(",")))
        if args.real:
            real = json.loads(args.real.read_text())["real"]
        else:
            args.model_dir.mkdir(parents=True, exist_ok=True)
            real = None
        gpu = args.gpu or ("H200" if torch.cuda.is_available() and "H200" in torch.cuda.get_device_name(0) else "H100")
        fake = estimates(configs, gpu)  # first: nothing of the real runs is alive in this process yet
        if real is None:
            real = real_runs(configs, args.model_dir)
        raw.update(real=real, estimate=fake)
        lines += ["## Accuracy", "", *table(real, fake, software), ""]
    if not args.estimate_only:
        found = speed(args.gpu or "H100")
        raw["speed"] = found
        lines += [
            "## Speed",
            "",
            f"8B QLoRA step (batch 1 x seq 2048, checkpointing) estimated in {found['seconds']:.1f} s wall "
            f"(imports included), peak RSS {found['rss'] / GiB:.2f} GiB, on {found['cpus']} CPU cores "
            f"({found['machine']}); {software}.",
            "",
        ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
