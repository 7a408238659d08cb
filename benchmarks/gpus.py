"""The example suite three ways: serial, pinned (one worker per GPU), packed (several workers per GPU).

    python benchmarks/gpus.py [--model-sizes tiny,1b] [--out benchmarks/results/gpus-1xH200.md --json ...]
    python benchmarks/gpus.py --smoke         # CI: the cpu backend, two tiny tests, a temporary --out

Serial records the baselines the packed run is admitted by (in a temporary directory, so the repo's own are
untouched); pinned runs ``-n <GPUs> --gpumem-gpus-per-worker 1``; packed runs ``-n <2 x GPUs> --gpumem-pack``.
It prints the wall time of each and checks that every test's ``allocated`` peak is, in every phase and on
every device, the same as its serial value. Recording baselines attributes every test (the storage tracker
beside the allocator's statistics), while the other runs take the fast path (the statistics alone): the
check is also that the fast path measures what the attribution's run measures. Checkpoints are made before
timing, so no run pays for them. On the cpu backend (``--backend cpu``) the workers share the CPU and packing
shares its memory: the same code paths, no GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest_subprocess
from results_file import check_written, fields, publish, smoke_out, write

ROOT = Path(__file__).resolve().parent.parent
TITLE = "The example suite serial, pinned and packed"
SMOKE = {"backend": "cpu", "model_sizes": "tiny", "select": "qlora-nf4 and not single or qlora-r64"}


def pytest_run(
    name: str, work: Path, backend: str, sizes: str, select: str | None, *args: str
) -> tuple[float, dict[str, dict[str, Any]]]:
    out = work / f"{name}.json"
    command = pytest_subprocess.command(
        "examples", "-q", f"--gpumem-backend={backend}", f"--model-sizes={sizes}",
        f"--gpumem-baselines={work / 'baselines'}", f"--gpumem-json={out}", *(["-k", select] if select else []),
        *args,
    )  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=pytest_subprocess.environment(), capture_output=True, text=True)
    wall = time.perf_counter() - start
    if not out.exists():
        sys.exit(f"{name}: no results\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    tests = {t["nodeid"]: t for t in json.loads(out.read_text())["tests"]}
    return wall, tests


def allocated(test: dict[str, Any]) -> dict[str, Any]:
    """A test's ``allocated`` peaks, per phase and device."""
    return {phase: peaks.get("allocated") for phase, peaks in test["sample"]["phases"].items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-sizes", default="tiny,1b")
    parser.add_argument("--backend", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--select", help="only the example tests that match this pytest -k expression")
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--json", type=Path, help="also write every run's wall time and per-test peaks here")
    parser.add_argument("--smoke", action="store_true", help="CI: cpu backend, two tiny tests, a temporary --out")
    options = parser.parse_args()
    if options.smoke:
        if options.out is not None or options.json is not None:
            parser.error("--smoke writes to temporary files; leave out --out and --json")
        for name, value in SMOKE.items():
            setattr(options, name, value)
        options.out = smoke_out("gpus.md")
        options.json = options.out.with_suffix(".json")
    import torch

    if options.backend == "cuda":
        gpus = torch.cuda.device_count()
        if gpus < 1:
            sys.exit("needs a CUDA GPU (or --backend cpu)")
        where = f"{gpus}x {torch.cuda.get_device_name(0)}"
    else:
        gpus, where = 1, "the CPU (one group: every worker shares it)"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from pytest_gpumem.models.loading import ensure_checkpoint

        for size in options.model_sizes.split(","):  # where the example suite's model fixture finds them
            ensure_checkpoint(ROOT / ".pytest_cache" / "d" / "gpumem-models", "llama", size.strip())
        runs = {
            "serial": ["--gpumem-update-baselines"],
            f"pinned: -n {gpus} --gpumem-gpus-per-worker 1": ["-n", str(gpus), "--gpumem-gpus-per-worker=1"],
            f"packed: -n {2 * gpus} --gpumem-pack": ["-n", str(2 * gpus), "--gpumem-pack"],
        }
        results = {}
        for label, args in runs.items():
            print(f"{label} ...", file=sys.stderr)
            results[label] = pytest_run(
                label.split(":")[0], work, options.backend, options.model_sizes, options.select, *args
            )
    serial = results["serial"][1]
    selection = f", `-k {options.select!r}`" if options.select else ""
    lines = [
        f"{len(serial)} example tests (`--model-sizes {options.model_sizes}`{selection}) on {where}, "
        f"{options.backend} backend; the runs one after another, once each.",
        "",
        "Serial records the baselines, so it attributes every test; pinned and packed take the fast path.",
        "",
        "| run | wall time | speed-up | tests | allocated peaks identical to serial (every phase) |",
        "|---|---:|---:|---:|---|",
    ]
    failures = []
    for label, (wall, tests) in results.items():
        differ = [
            nodeid
            for nodeid, test in serial.items()
            if nodeid not in tests or allocated(tests[nodeid]) != allocated(test)
        ]
        failures += [f"{label}: {nodeid}" for nodeid in differ]
        same = "yes, every test" if not differ else f"NO: {len(differ)} differ"
        lines.append(f"| {label} | {wall:.1f} s | {results['serial'][0] / wall:.2f}x | {len(tests)} | {same} |")
    lines += ["", "Per test, allocated peak of the call phase (serial), by device:", ""]
    for nodeid, test in sorted(serial.items()):
        per_device = test["sample"]["phases"]["call"]["allocated"]
        lines.append(f"- `{nodeid}`: " + ", ".join(f"{d} {n:,} B" for d, n in sorted(per_device.items())))
    publish("\n".join(lines), options.out, TITLE)
    if options.json:
        runs_out = {
            label: {"wall_s": wall, "peaks": {n: t["sample"]["phases"]["call"] for n, t in sorted(tests.items())}}
            for label, (wall, tests) in results.items()
        }
        write(options.json, json.dumps({**fields(), "runs": runs_out}, indent=2, sort_keys=True))
    if failures:
        sys.exit("allocated peaks differ from serial:\n" + "\n".join(failures))
    if options.smoke:
        check_written(options.out, TITLE)
        if set(json.loads(options.json.read_text())) != {*fields(), "runs"}:
            sys.exit(f"{options.json}: not the header's fields and the runs")


if __name__ == "__main__":
    main()
