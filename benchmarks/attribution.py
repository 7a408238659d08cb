"""What measuring and attributing a QLoRA training step cost, each way, and how well the attribution adds up.

For each configuration the same model trains ``--steps`` steps in four modes,
interleaved (the order rotates every round, ``--rounds`` rounds):

- ``plain``: not measured;
- ``fast``: measured by the meter's statistics alone (the default on cuda: no
  tracker, no discovery, no probe);
- ``trace``: the fast path with the CUDA allocator recording its own trace
  (``_record_memory_history``, no stacks), plus the hooks a trace-based
  attribution needs to know the gradients' and optimizer state's addresses;
- ``tracker``: the attribution's storage tracker and the advisor's hooks on,
  as ``--gpumem-attribute=always`` runs every test, and as the explain path
  runs a test again.

Then what explaining a failed test costs, apart from the step: the explain path
the plugin takes (a second run with the tracker: its whole measured run, and
counting what the test held when it began), and the alternative of the trace
(a snapshot, and the live blocks at the trace's peak classified by address
against the model's parameters, the gradients and the optimizer state). And
the fixed cost of measuring a test that does nothing, per mode.

    python benchmarks/attribution.py                       # tiny Llama on the CPU (no trace mode there)
    python benchmarks/attribution.py --sizes 1b --batch 4 --seq 1024 --out benchmarks/results/attribution-cuda.md
    python benchmarks/attribution.py --smoke               # CI: tiny, CPU, seconds
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from results_file import apply_smoke, check_written, publish

TITLE = "What measuring and attributing a training step cost, each way, and how well the attribution adds up"
SMOKE = {"sizes": "tiny", "batch": 2, "seq": 32, "steps": 1, "rounds": 2, "backend": "cpu", "empty_tests": 20}
GIB = 2**30
MODES = ("plain", "fast", "trace", "tracker")
WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS = "weights", "gradients", "optimizer", "activations"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="tiny", help="comma-separated Llama sizes (default: tiny)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds of every mode (default: 4)")
    parser.add_argument("--empty-tests", type=int, default=200, help="empty measurements timed per mode")
    parser.add_argument("--backend", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-models")
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: tiny model, CPU, one step, a temporary --out")
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, "attribution.md")

    from pytest_gpumem.config.backend import create, resolve_backend
    from pytest_gpumem.models import loading

    backend = resolve_backend(args.backend)
    modes = MODES if backend == "cuda" else tuple(m for m in MODES if m != "trace")
    meters = {"fast": create(backend, attribute=False), "tracker": create(backend, attribute=True)}
    device_map = {"": 0} if backend == "cuda" else None
    cost_rows, explain_rows = [], []
    for size in args.sizes.split(","):
        path = loading.ensure_checkpoint(args.model_dir, "llama", size)
        for checkpointing in (False, True):
            model = loading.add_lora(
                loading.load(path, "nf4", True, "bfloat16", device_map), r=16, gradient_checkpointing=checkpointing
            )
            name = f"{size} nf4 r16 b{args.batch}x{args.seq} {'GC' if checkpointing else 'no GC'}"
            runs = Runs(model, backend, meters, args)
            runs.step("plain")  # the first step of a model pays for kernels' first use: in no mode
            for round_ in range(args.rounds):
                for mode in modes[round_ % len(modes) :] + modes[: round_ % len(modes)]:
                    runs.step(mode)
            cost_rows.append(runs.cost_row(name, modes))
            explain_rows.append(runs.explain_row(name))
            del model, runs
    fixed = fixed_costs(meters, args.empty_tests)
    publish(render(backend, args, modes, cost_rows, explain_rows, fixed), args.out, TITLE)
    if args.smoke:
        check_written(args.out, TITLE)


class Runs:
    """One configuration's model, run in every mode; keeps each run's step time, peak and attribution."""

    def __init__(self, model: Any, backend: str, meters: dict[str, Any], args: argparse.Namespace) -> None:
        self.model, self.backend, self.meters, self.args = model, backend, meters, args
        self.times: dict[str, list[float]] = {mode: [] for mode in MODES}
        self.ratios: dict[str, list[float]] = {mode: [] for mode in MODES}
        self.peaks: dict[str, set[int]] = {mode: set() for mode in MODES}
        self.rerun_seconds: list[float] = []
        self.held_ms: list[float] = []
        self.snapshot_ms: list[float] = []
        self.classify_ms: list[float] = []
        self.entries = 0
        self.tracker_attributed: tuple[int, int] | None = None  # (attributed, allocator peak)
        self.trace_attributed: tuple[int, int, dict[str, int]] | None = None

    def _sync(self) -> None:
        if self.backend == "cuda":
            import torch

            torch.cuda.synchronize()

    def _train(self) -> float:
        from pytest_gpumem.models import training

        self._sync()
        start = time.perf_counter()
        training.train_steps(self.model, batch=self.args.batch, seq=self.args.seq, steps=self.args.steps)
        self._sync()
        return (time.perf_counter() - start) / self.args.steps

    def step(self, mode: str) -> None:
        if mode == "plain":
            self.times[mode].append(self._train())
            return
        from pytest_gpumem.measure import rerun
        from pytest_gpumem.measure.measurement import Measurement

        recorder = TraceRecorder() if mode == "trace" else None
        began = time.perf_counter()
        measurement = Measurement(self.meters["tracker" if mode == "tracker" else "fast"], explain=mode == "tracker")
        measurement.enter("call")
        seconds = self._train()
        measurement.exit("call")
        held = None
        if measurement.attributor is not None:
            counted = time.perf_counter()
            models = [*measurement.registration.models, *measurement.discovery.models]
            optimizers = measurement.discovery.optimizers
            device = "cuda:0" if self.backend == "cuda" else "cpu"
            held = rerun.untracked(models, optimizers, measurement.attributor.tracker, device)
            self.held_ms.append(1000 * (time.perf_counter() - counted))
        sample = measurement.finish()
        self._sync()
        if mode == "tracker":
            self.rerun_seconds.append(time.perf_counter() - began)
        peak = max(sample.phases["call"]["allocated"].values())
        self.peaks[mode].add(peak)
        self.times[mode].append(seconds)
        plain = self.times["plain"][-1]
        self.ratios[mode].append(seconds / plain)
        if sample.attribution is not None and held is not None:
            self.tracker_attributed = (sample.attribution.peak.total, peak)
        if recorder is not None:
            taken = time.perf_counter()
            snapshot = recorder.snapshot()
            self.snapshot_ms.append(1000 * (time.perf_counter() - taken))
            classified = time.perf_counter()
            consumers = recorder.classify(snapshot, self.model)
            self.classify_ms.append(1000 * (time.perf_counter() - classified))
            self.entries = len(snapshot["device_traces"][0])
            self.trace_attributed = (sum(consumers.values()), peak, consumers)
            recorder.stop()

    def cost_row(self, name: str, modes: tuple[str, ...]) -> list[str]:
        row = [name]
        for mode in MODES:
            times = self.times[mode]
            row.append(_spread([1000 * t for t in times], "{:.0f}") if mode in modes else "-")
        for mode in MODES[1:]:
            row.append(_spread(self.ratios[mode], "{:.3f}") if mode in modes else "-")
        peaks = set().union(*(self.peaks[m] for m in modes if m != "plain"))
        row.append("yes" if len(peaks) == 1 else f"no: {sorted(peaks)}")
        return row

    def explain_row(self, name: str) -> list[str]:
        def share(pair: tuple[int, int] | None) -> str:
            if pair is None:
                return "-"
            attributed, peak = pair
            return f"{attributed / GIB:.3f} of {peak / GIB:.3f} ({100 * (attributed - peak) / peak:+.2f}%)"

        trace = self.trace_attributed
        split = (
            " / ".join(f"{trace[2][c] / GIB:.3f}" for c in (WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS))
            if trace
            else "-"
        )
        return [
            name,
            _spread(self.rerun_seconds, "{:.2f}"),
            _spread(self.held_ms, "{:.1f}"),
            share(self.tracker_attributed),
            _spread(self.snapshot_ms, "{:.0f}") + (f" ({self.entries} entries)" if self.entries else ""),
            _spread(self.classify_ms, "{:.0f}"),
            share((trace[0], trace[1]) if trace else None),
            split,
        ]


class TraceRecorder:
    """The trace alternative: the allocator records alloc/free events without stacks, and hooks note the
    addresses of gradients (as accumulated) and optimizer state (after each step), which are often freed
    before the end of the test."""

    def __init__(self) -> None:
        import torch
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.gradients: set[int] = set()
        self.optimizer: set[int] = set()
        torch.cuda.memory._record_memory_history("all", context=None, max_entries=10_000_000, clear_history=True)
        self._handles = [register_optimizer_step_post_hook(self._stepped), *self._gradient_hooks()]

    def _gradient_hooks(self) -> list[Any]:
        import gc

        import torch

        hooks = []
        for obj in gc.get_objects():  # the benchmark's own LoRA parameters (a discovering plugin knows them)
            if isinstance(obj, torch.nn.Parameter) and obj.requires_grad and obj.is_cuda:
                hooks.append(obj.register_post_accumulate_grad_hook(self._accumulated))
        return hooks

    def _accumulated(self, param: Any) -> None:
        if param.grad is not None:
            self.gradients.add(param.grad.untyped_storage().data_ptr())

    def _stepped(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if hasattr(value, "untyped_storage") and value.is_cuda:
                    self.optimizer.add(value.untyped_storage().data_ptr())

    def snapshot(self) -> dict[str, Any]:
        import torch

        return torch.cuda.memory._snapshot()

    def stop(self) -> None:
        import torch

        for handle in self._handles:
            handle.remove()
        torch.cuda.memory._record_memory_history(None)

    def classify(self, snapshot: dict[str, Any], model: Any) -> dict[str, int]:
        """The blocks allocated during the trace and alive at its peak, by consumer (by address)."""
        from pytest_gpumem.measure.introspect import quantization_statistics

        weights = set()
        for module in model.modules():
            for param in module.parameters(recurse=False):
                weights.add(param.untyped_storage().data_ptr())
                weights.update(t.untyped_storage().data_ptr() for t in quantization_statistics(param, module))
            weights.update(b.untyped_storage().data_ptr() for b in module.buffers(recurse=False))
        trace = snapshot["device_traces"][0]
        running, peak, peak_at = 0, 0, -1
        for index, entry in enumerate(trace):
            running += _change(entry)
            if running > peak:
                peak, peak_at = running, index
        live: dict[int, int] = {}
        for entry in trace[: peak_at + 1]:
            if entry["action"] == "alloc":
                live[entry["addr"]] = entry["size"]
            elif entry["action"] == "free_completed":
                live.pop(entry["addr"], None)
        consumers = dict.fromkeys((WEIGHTS, GRADIENTS, OPTIMIZER, ACTIVATIONS), 0)
        for address, size in live.items():
            if address in weights:
                consumers[WEIGHTS] += size
            elif address in self.gradients:
                consumers[GRADIENTS] += size
            elif address in self.optimizer:
                consumers[OPTIMIZER] += size
            else:
                consumers[ACTIVATIONS] += size
        return consumers


def _change(entry: dict[str, Any]) -> int:
    action = entry["action"]
    return entry["size"] if action == "alloc" else -entry["size"] if action == "free_completed" else 0


def fixed_costs(meters: dict[str, Any], count: int) -> dict[str, list[float]]:
    """Milliseconds to measure a test that does nothing (begin, the call phase, finish), per mode, after the
    collector was frozen as the plugin freezes it before each test (that collection is not timed)."""
    from pytest_gpumem.measure import collector
    from pytest_gpumem.measure.measurement import Measurement

    costs: dict[str, list[float]] = {"fast": [], "tracker": []}
    for _ in range(count):
        for mode, samples in costs.items():
            collector.freeze_between_tests()  # as the plugin does before a test; the collector's cost is apart
            start = time.perf_counter()
            measurement = Measurement(meters[mode], explain=mode == "tracker")
            with measurement.phase("call"):
                pass
            measurement.finish()
            samples.append(1000 * (time.perf_counter() - start))
    return costs


def _spread(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    median = statistics.median(values)
    return f"{fmt.format(median)} ({fmt.format(min(values))} to {fmt.format(max(values))})"


def _table(columns: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def render(
    backend: str,
    args: argparse.Namespace,
    modes: tuple[str, ...],
    cost_rows: list[list[str]],
    explain_rows: list[list[str]],
    fixed: dict[str, list[float]],
) -> str:
    lines = [
        f"{backend} backend; nf4 with double quantization, LoRA r16 on all linear layers, AdamW; "
        f"steps a run: {args.steps}; interleaved rounds of {', '.join(modes)}: {args.rounds} (median, and range).",
        "",
        "**A step, each way.** ms a step; the ratio is each round's time over that round's plain run.",
        "",
        *_table(
            [
                "configuration",
                *(f"{m} ms" for m in MODES),
                *(f"{m} / plain" for m in MODES[1:]),
                "same allocated peak in every measured mode",
            ],
            cost_rows,
        ),
        "",
        "**Explaining a failed test, apart from the step.** The plugin's way: the second run with the tracker "
        "(its whole measured run, steps included) and counting what the test held when it began; the "
        "tracker's consumers beside the allocator's peak. The trace's way: the snapshot, and the blocks alive "
        "at the trace's peak classified by address.",
        "",
        *_table(
            [
                "configuration",
                "second run s",
                "held counted ms",
                "tracker attributed GiB",
                "trace snapshot ms",
                "trace classified ms",
                "trace attributed GiB",
                "trace weights / gradients / optimizer / activations GiB",
            ],
            explain_rows,
        ),
        "",
        f"**The fixed cost of a measured test that does nothing** ({args.empty_tests} each, interleaved): "
        + "; ".join(f"{mode} {_spread(samples, '{:.3f}')} ms" for mode, samples in fixed.items())
        + ". The plugin's own cost per test (hooks, judge, reports) is `benchmarks/overhead.py`'s.",
        "",
        "The model is loaded once per configuration; weights are resident before each measurement, so they are "
        "not part of the measured peak (the trace classifies only what was allocated while it recorded).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
