"""The GPU example suite three ways: serial, pinned (one worker per GPU), packed (several workers per GPU).

    python benchmarks/gpus.py [--model-sizes tiny,1b] [--out benchmarks/results/gpus.md]

Serial records the baselines the packed run is admitted by (in a temporary directory, so the repo's own are
untouched); pinned runs ``-n <GPUs> --gpumem-gpus-per-worker 1``; packed runs ``-n <2 x GPUs> --gpumem-pack``.
It prints the wall time of each and checks that every test's ``allocated`` peak is, on every device, the
same as its serial value; the table goes to ``--out`` too. Checkpoints are made before timing, so no run
pays for them.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pytest_run(name: str, work: Path, sizes: str, *args: str) -> tuple[float, dict[str, dict], str]:
    out = work / f"{name}.json"
    command = [
        sys.executable, "-m", "pytest", "examples", "-q", "--gpumem-backend=cuda", f"--model-sizes={sizes}",
        f"--gpumem-baselines={work / 'baselines'}", f"--gpumem-json={out}", *args,
    ]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if not out.exists():
        sys.exit(f"{name}: no results\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
    tests = {t["nodeid"]: t for t in json.loads(out.read_text())["tests"]}
    return wall, tests, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-sizes", default="tiny,1b")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path, help="also write every run's wall time and per-test peaks here")
    options = parser.parse_args()
    import torch

    gpus = torch.cuda.device_count()
    if gpus < 1:
        sys.exit("needs a CUDA GPU")
    name = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from pytest_gpumem.models import ensure_checkpoint

        for size in options.model_sizes.split(","):  # where the example suite's model fixture finds them
            ensure_checkpoint(ROOT / ".pytest_cache" / "d" / "gpumem-models", "llama", size.strip())
        runs = {
            "serial": ["--gpumem-update-baselines"],
            f"pinned: -n {gpus} --gpumem-gpus-per-worker 1": ["-n", str(gpus), "--gpumem-gpus-per-worker=1"],
        }
        runs[f"packed: -n {2 * gpus} --gpumem-pack"] = ["-n", str(2 * gpus), "--gpumem-pack"]
        results = {
            label: pytest_run(label.split(":")[0], work, options.model_sizes, *args) for label, args in runs.items()
        }
    serial = results["serial"][1]
    lines = [
        f"# {len(serial)} example tests (`--model-sizes {options.model_sizes}`) on {gpus}x {name}",
        "",
        f"torch {torch.__version__}; python {sys.version.split()[0]}",
        "",
        "| run | wall time | speed-up | tests | allocated peaks identical to serial |",
        "|---|---:|---:|---:|---|",
    ]
    failures = []
    for label, (wall, tests, _) in results.items():
        differ = [
            nodeid
            for nodeid, test in serial.items()
            if nodeid not in tests
            or tests[nodeid]["sample"]["phases"]["call"]["allocated"] != test["sample"]["phases"]["call"]["allocated"]
        ]
        failures += [f"{label}: {nodeid}" for nodeid in differ]
        same = "yes, every test" if not differ else f"NO: {len(differ)} differ"
        lines.append(f"| {label} | {wall:.1f} s | {results['serial'][0] / wall:.2f}x | {len(tests)} | {same} |")
    lines += ["", "Per test, allocated peak of the call phase (serial), by device:", ""]
    for nodeid, test in sorted(serial.items()):
        per_device = test["sample"]["phases"]["call"]["allocated"]
        lines.append(f"- `{nodeid}`: " + ", ".join(f"{d} {n:,} B" for d, n in sorted(per_device.items())))
    text = "\n".join(lines) + "\n"
    print(text)
    if options.out:
        options.out.write_text(text)
    if options.json:
        runs_out = {
            label: {"wall_s": wall, "peaks": {n: t["sample"]["phases"]["call"] for n, t in sorted(tests.items())}}
            for label, (wall, tests, _) in results.items()
        }
        options.json.write_text(json.dumps(runs_out, indent=2, sort_keys=True) + "\n")
    if failures:
        sys.exit("allocated peaks differ from serial:\n" + "\n".join(failures))


if __name__ == "__main__":
    main()
