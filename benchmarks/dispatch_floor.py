"""What seeing every CPU storage costs at least: the example suite's test body under each way of seeing them.

The cpu meter sees storages through a ``TorchDispatchMode``, which calls into Python for every operator. This
times one example test's body (a tiny Llama-shaped checkpoint loaded in nf4 through ``from_pretrained``, LoRA
through peft, two AdamW steps: the suite's ``qlora-nf4`` case, about 4,000 operators) in process CPU time, in
each of these ways, interleaved (the order rotates every round):

- ``plain``: nothing watches;
- ``floor``: a dispatch mode that only calls each operator through, the least any mode costs;
- ``tracker``: the cpu meter's storage tracker as a passing test runs under it (the fast path);
- ``attributed``: the tracker keeping the attribution's records, as a test with something to explain runs.

Each run starts after a full garbage collection, as a measured test does.

The ratios say how far the tracker is above the floor, and how far the floor is above the plain run: the
part no per-operator Python hook can remove.

    python benchmarks/dispatch_floor.py --out benchmarks/results/dispatch-floor-cpu.md
    python benchmarks/dispatch_floor.py --smoke     # CI: two rounds, a temporary --out
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from results_file import aligned_table, apply_smoke, check_written, publish

TITLE = "What seeing every CPU storage costs at least: the example test's body under each way of seeing them"
SMOKE = {"rounds": 2}
WAYS = ("plain", "floor", "tracker", "attributed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of every way (default: 7)")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-models")
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: two rounds, a temporary --out")
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, "dispatch-floor.md")
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: threads waiting for a core would add noise

    import torch

    from pytest_gpumem.models import loading, training

    torch.set_num_threads(1)
    path = loading.ensure_checkpoint(args.model_dir, "llama", "tiny")

    def body() -> None:
        model = loading.add_lora(loading.load(path, "nf4", True, "bfloat16", None), r=8, gradient_checkpointing=True)
        training.train_steps(model, batch=2, seq=64, steps=2)

    ways = watchers()
    seconds: dict[str, list[float]] = {way: [] for way in WAYS}
    operators = count_operators(body)
    for way in WAYS:  # the first run of each way pays for first use (imports, kernels' first calls): timed by none
        with ways[way]():
            body()
    for round_ in range(args.rounds):
        for way in WAYS[round_ % len(WAYS) :] + WAYS[: round_ % len(WAYS)]:
            gc.collect()
            start = time.process_time()
            with ways[way]():
                body()
            seconds[way].append(time.process_time() - start)
    publish(render(seconds, operators, args.rounds), args.out, TITLE)
    if args.smoke:
        check_written(args.out, TITLE)


def watchers() -> dict[str, Callable[[], contextlib.AbstractContextManager[Any]]]:
    """Each way of watching the body, as a context manager factory."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from pytest_gpumem.measure.meters.tracker import StorageTracker

    class CallThrough(TorchDispatchMode):
        @classmethod
        def _should_skip_dynamo(cls) -> bool:
            return False  # as the tracker: no dynamo-disabling shim around every call

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            return func(*args, **kwargs) if kwargs else func(*args)

    return {
        "plain": contextlib.nullcontext,
        "floor": CallThrough,
        "tracker": lambda: StorageTracker(attribute=False),
        "attributed": lambda: StorageTracker(attribute=True),
    }


def count_operators(body: Callable[[], None]) -> int:
    """How many operators the body dispatches."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            Counter.calls += 1
            return func(*args, **(kwargs or {}))

    with Counter():
        body()
    return Counter.calls


def render(seconds: dict[str, list[float]], operators: int, rounds: int) -> str:
    plain = statistics.median(seconds["plain"])
    floor = statistics.median(seconds["floor"])
    rows = [["way", "CPU time (ms, median)", "fastest to slowest (ms)", "ratio to plain", "ratio to floor"]]
    for way in WAYS:
        median = statistics.median(seconds[way])
        rows.append(
            [
                way,
                f"{median * 1e3:.1f}",
                f"{min(seconds[way]) * 1e3:.1f} to {max(seconds[way]) * 1e3:.1f}",
                f"{median / plain:.3f}",
                f"{median / floor:.3f}",
            ]
        )
    per_operator = (floor - plain) / operators * 1e6
    lines = [
        f"One example test's body (tiny Llama, nf4 load, LoRA r8, two AdamW steps of batch 2 x 64; {operators:,} "
        f"operators), process CPU time, torch on one thread; {rounds} interleaved rounds, medians.",
        "",
        *aligned_table(rows),
        "",
        f"The floor (a dispatch mode that only calls through) costs {per_operator:.1f} µs an operator over the "
        "plain run. `tracker` is what a passing test pays on the cpu backend, `attributed` what an explained "
        "one pays.",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
