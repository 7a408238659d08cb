"""The example suite on a real GPU: what each setup takes, and whether a second run repeats it.

The suite runs twice in fresh processes: first recording its baselines (in a
temporary directory, so the repo's own are untouched), then judged against
them. The table gives each test's own share of the first run (the call's peak
above what was resident when its setup began; ``device`` is NVML's reading at
phase boundaries, less its reading before the test), and the second run's
verdicts and its largest difference from the first.

    python benchmarks/gpu_examples.py [--model-sizes tiny,1b] [--out benchmarks/results/gpu-examples.md]
    python benchmarks/gpu_examples.py --smoke      # CI: the cpu backend, two tiny tests, a temporary --out
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest_subprocess
from results_file import apply_smoke, check_written, publish

ROOT = Path(__file__).resolve().parent.parent
SUITE = ROOT / "examples" / "test_finetune_memory.py"
TITLE = "The example suite on a real GPU"
SMOKE = {"backend": "cpu", "model_sizes": "tiny", "select": "qlora-nf4 and not single or lora-bf16"}
GIB = 2**30


def run_suite(name: str, work: Path, options: argparse.Namespace, *args: str) -> dict[str, Any]:
    """One run of the example suite; its JSON report."""
    out = work / f"{name}.json"
    command = pytest_subprocess.command(
        "examples", "-q", f"--gpumem-backend={options.backend}",
        f"--model-sizes={options.model_sizes}", f"--gpumem-baselines={work / 'baselines'}", f"--gpumem-json={out}",
        *(["-k", options.select] if options.select else []), *args,
    )  # fmt: skip
    print(f"{name}: {shlex.join(command[1:])}", file=sys.stderr)
    done = subprocess.run(command, cwd=ROOT, env=pytest_subprocess.environment(), capture_output=True, text=True)
    if not out.exists():
        sys.exit(f"{name}: no results\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    report: dict[str, Any] = json.loads(out.read_text())
    return report


def setups() -> Any:
    """The example suite's own table of setups, so that the table describes what ran."""
    spec = importlib.util.spec_from_file_location("example_suite", SUITE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def largest(per_device: dict[str, int] | None) -> int | None:
    return max(per_device.values()) if per_device else None


def cell(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def describe(report: dict[str, Any], suite: Any) -> tuple[list[str], list[str]]:
    """The table's rows (one per training step) and the nf4 load footprints, from a run's JSON report."""
    rows, footprints = [], []
    for test in sorted(report["tests"], key=lambda t: t["nodeid"]):
        name, _, params = test["nodeid"].partition("::")[2].partition("[")
        size, _, setup_name = params.rstrip("]").partition("-")
        call = test["sample"]["phases"]["call"]
        if name == "test_finetune_step":
            setup = suite.SETUPS[setup_name]
            quant = setup.quant if setup.quant != "nf4" else "nf4 + double quant" if setup.double_quant else "nf4"
            allocated = largest(call.get("allocated"))
            rows.append(
                f"| {size} | {setup_name} | {quant}, r{setup.r} | {'on' if setup.gradient_checkpointing else 'off'} "
                f"| {setup.batch} x {suite.sequence_length(size, setup.seq_factor)} "
                f"| {cell(allocated)} ({(allocated or 0) / GIB:.2f} GiB) | {cell(largest(call.get('reserved')))} "
                f"| {cell(largest(call.get('device')))} |"
            )
        elif name == "test_nf4_load_footprint":
            phases = test["sample"]["phases"]
            bf16, nf4 = largest(phases["bf16"]["allocated"]), largest(phases["nf4"]["allocated"])
            if bf16 and nf4:
                footprints.append(
                    f"- {size}: nf4 {nf4 / 1e9:.2f} GB against bf16 {bf16 / 1e9:.2f} GB: {nf4 / bf16:.2f} of it"
                )
    return rows, footprints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-sizes", default="tiny,1b")
    parser.add_argument("--backend", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--select", help="only the example tests that match this pytest -k expression")
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: cpu backend, two tiny tests, a temporary --out")
    options = parser.parse_args()
    apply_smoke(parser, options, SMOKE, "gpu-examples.md")
    if options.backend == "cuda":
        import torch

        if not torch.cuda.is_available():
            sys.exit("needs a CUDA GPU (or --backend cpu)")
    from pytest_gpumem.models.loading import ensure_checkpoint

    for size in options.model_sizes.split(","):  # made before either run, so that neither pays for it
        ensure_checkpoint(ROOT / ".pytest_cache" / "d" / "gpumem-models", "llama", size.strip())
    with tempfile.TemporaryDirectory() as tmp:
        first = run_suite("record", Path(tmp), options, "--gpumem-update-baselines")
        second = run_suite("repeat", Path(tmp), options)

    rows, footprints = describe(first, setups())
    verdicts = Counter(test["verdict"]["status"] for test in second["tests"])
    differences = [
        (abs(test["verdict"]["value"] - test["verdict"]["baseline"]), test["nodeid"])
        for test in second["tests"]
        if test["verdict"].get("baseline") is not None and test["verdict"].get("value") is not None
    ]
    worst = max(differences, default=(0, "-"))
    environment = first["environment"]
    lines = [
        f"Backend {options.backend}, `--model-sizes {options.model_sizes}`"
        + (f", `-k {options.select!r}`" if options.select else "")
        + f"; hardware {', '.join(environment['hardware'])}. Shapes are the Llama presets with random weights, "
        "saved with `save_pretrained` and loaded through `from_pretrained`; each test gets a fresh model and "
        "does two AdamW steps. Bytes; GiB = 2^30 bytes.",
        "",
        "| size | setup | quant, LoRA | GC | batch x seq | peak allocated (B) | reserved (B) | device-used (B) |",
        "|---|---|---|---|---|---:|---:|---:|",
        *rows,
        "",
    ]
    if footprints:
        lines += ["nf4 load footprint (peak allocated of each load, `test_nf4_load_footprint`):", "", *footprints, ""]
    lines.append(
        "Second run, judged against the first with the suite's tolerance: "
        + ", ".join(f"{count} {status}" for status, count in sorted(verdicts.items()))
        + f"; largest difference {worst[0]:,} B"
        + (f" (`{worst[1]}`)." if worst[0] else ".")
    )
    publish("\n".join(lines), options.out, TITLE)
    if options.smoke:
        check_written(options.out, TITLE)


if __name__ == "__main__":
    main()
