"""What a worker's device offers, measured in a fresh process pinned as the worker is.

The packing scheduler runs in pytest-xdist's controller, which must not start
CUDA itself (a context there would take memory from the tests on GPU 0). So
before tests are scheduled, one short-lived process per GPU group starts the
cuda meter exactly as a worker does (the context, the cuBLAS workspaces of
its warm-up) and reports the group's hardware key, the smallest device's
memory, and what NVML counts of that process: what every worker keeps
resident before its first test. Workers then report their own resident
memory with every result.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass

from pytest_gpumem.measure.machine import hardware_key
from pytest_gpumem.measure.meters.cuda import CudaMeter, process_used
from pytest_gpumem.xdist.pinning import ENV


@dataclass(frozen=True)
class DeviceFacts:
    hardware: str  # the baselines' hardware key
    total: int  # bytes of the smallest device of the group
    resident: int | None  # what a worker keeps resident there before any test; None: NVML could not tell


class ProbeError(RuntimeError):
    pass


def physical_memory() -> int:
    """The machine's RAM: what workers that pack tests on the cpu backend share."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def probe(groups: list[list[str]], timeout: float = 180) -> list[DeviceFacts]:
    """The facts of each group of GPUs (``CUDA_VISIBLE_DEVICES`` tokens), probed side by side."""
    runs = []
    for devices in groups:
        env = {**os.environ, ENV: ",".join(devices)}
        runs.append(
            subprocess.Popen(
                [sys.executable, "-c", "from pytest_gpumem.xdist.probe import main; main()"],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    facts = []
    try:
        for devices, run in zip(groups, runs, strict=True):
            where = f"probing GPU(s) {','.join(devices)} for --gpumem-pack"
            try:
                out, err = run.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                raise ProbeError(f"{where}: no answer within {timeout:.0f} s") from None
            if run.returncode != 0:
                last = (err.strip().splitlines() or ["no output"])[-1]
                raise ProbeError(f"{where} failed: {last}")
            try:
                facts.append(DeviceFacts(**json.loads(out.strip().splitlines()[-1])))
            except (IndexError, ValueError, TypeError):
                raise ProbeError(f"{where}: unreadable answer {out.strip()[-200:]!r}") from None
    finally:
        for run in runs:
            if run.poll() is None:
                run.kill()
                run.wait()
    return facts


def main() -> None:
    """In the probe process: start the cuda meter as a worker does and print the facts as JSON."""
    import torch

    meter = CudaMeter(attribute=False)
    total = min(torch.cuda.get_device_properties(index).total_memory for index in meter.devices)
    used = process_used(meter._nvml) if meter._nvml else None
    facts = DeviceFacts(hardware_key("cuda"), total, max(used) if used else None)
    print(json.dumps(facts.__dict__))


if __name__ == "__main__":
    main()
