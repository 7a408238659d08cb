"""How close the estimate comes to a real GPU, on runs it was fitted on and on runs it was not.

Two steps, two machines:

1. ``--measure`` (a CUDA GPU) runs every case for real and writes the raw figures, as JSON, case by case
   (a case that fails is recorded as such, out of memory included; the file is rewritten whole after each
   case, so an interrupted run keeps what it measured):

       python benchmarks/estimate_accuracy.py --measure --json benchmarks/results/estimate-accuracy-h200.json

2. Without ``--measure`` (any machine, no GPU) the script estimates every measured case on fake tensors,
   fits the reserved model's one constant on the in-sample cases only, scores the estimate on both sets,
   and times one 8B estimate; the results file (Markdown, and ``--json`` the same numbers) is written whole
   by this one run:

       python benchmarks/estimate_accuracy.py --real benchmarks/results/estimate-accuracy-h200.json \\
           --out benchmarks/results/estimate-accuracy.md --json benchmarks/results/estimate-accuracy.json

``--smoke``: tiny models, the estimate path only, on the CPU, in seconds; writes a temporary file.

The two sets:

- **in-sample** (the recipe the estimate was first built on, and what the reserved share is fitted on):
  Llama 3.2 1B and Llama 3.1 8B shapes, without checkpointing and with non-reentrant checkpointing, batch 1
  and 4 x seq 1024 and 2048, in a Trainer-like loop (the outputs dropped before backward);
- **out-of-sample**: other shapes (TinyLlama 1.1B, Qwen2.5 1.5B with tied embeddings and a 151936-token
  vocabulary, Mistral 7B v0.1 with its sliding window), the other checkpointing variant (reentrant, what
  peft's kbit preparation gives by default) on every shape, the tutorials' loop (``outputs = model(...);
  outputs.loss.backward()``), batch and sequence shapes not in the fit set, and ``use_cache=False``.

Every case loads the model as a user does: random weights saved as a checkpoint and loaded through
``from_pretrained`` with a ``BitsAndBytesConfig`` (nf4, double quantization, bfloat16 compute), the config's
``use_cache`` left as it is unless the case says otherwise; ``prepare_model_for_kbit_training(model,
use_gradient_checkpointing=...)`` with peft's defaults (``gradient_checkpointing_kwargs={"use_reentrant":
False}`` for the non-reentrant cases); LoRA r16 on all linear layers; ``torch.optim.AdamW``; ``labels`` =
the inputs; a warm-up step, then the measured step. The measured figure is the allocator's allocated peak
over the measured step (absolute: the model, optimizer state and cuBLAS workspaces included, in a process
holding nothing else). During the measured step the allocator's history is recorded, and what was alive at
its peak is kept (largest blocks, and the Python frames that made them) to show where an estimate went wrong.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the plugin, installed or not

from results_file import check_written, fields, header, smoke_out, write

GiB = 2**30

# -- the cases

LLAMA_1B = {  # meta-llama/Llama-3.2-1B
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}
LLAMA_8B = {  # meta-llama/Llama-3.1-8B
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
    "rope_theta": 500000.0,
    "max_position_embeddings": 131072,
}
TINYLLAMA = {  # TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "max_position_embeddings": 2048,
}
QWEN2_15B = {  # Qwen/Qwen2.5-1.5B: tied embeddings, biased q/k/v projections
    "hidden_size": 1536,
    "intermediate_size": 8960,
    "num_hidden_layers": 28,
    "num_attention_heads": 12,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "use_sliding_window": False,
}
MISTRAL_7B = {  # mistralai/Mistral-7B-v0.1 (a 4096-token sliding window)
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "max_position_embeddings": 32768,
}
TINY = {
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1024,
    "max_position_embeddings": 512,
}

SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-3.2-1b": ("llama", LLAMA_1B),
    "llama-3.1-8b": ("llama", LLAMA_8B),
    "tinyllama-1.1b": ("llama", TINYLLAMA),
    "qwen2.5-1.5b": ("qwen2", QWEN2_15B),
    "mistral-7b-v0.1": ("mistral", MISTRAL_7B),
    "tiny-llama": ("llama", {**TINY, "tie_word_embeddings": False}),
    "tiny-qwen2": ("qwen2", {**TINY, "tie_word_embeddings": True}),
}
"""Model shapes by name: the architecture and its config (random weights; memory depends on shapes only)."""

VARIANTS = ("none", "non-reentrant", "reentrant")
"""No gradient checkpointing, or checkpointing in one of its two variants."""

LOOPS = ("plain", "trainer")
"""How the training loop holds the model's outputs: ``plain`` is the loop of the tutorials
(``outputs = model(...); outputs.loss.backward()``: the logits stay referenced through backward, and into the
next step's forward pass); ``trainer`` drops them before backward, as transformers' ``Trainer`` does (and
``pytest_gpumem.models.training.train_steps``, the recipe the estimate was first built on)."""


@dataclass(frozen=True)
class Case:
    shape: str
    variant: str
    batch: int
    seq: int
    sample: str  # "in" (fit set) or "out"
    loop: str = "plain"  # see LOOPS
    use_cache: bool = True  # model.config.use_cache, as from_pretrained leaves these models' configs

    @property
    def name(self) -> str:
        checkpointing = "no gc" if self.variant == "none" else f"gc {self.variant}"
        cache = "" if self.use_cache else ", use_cache=False"
        return f"{self.shape} b{self.batch}x{self.seq} {checkpointing} {self.loop} loop{cache}"


def cases() -> list[Case]:
    """Every case, grouped by shape (a model is made once per shape, and loaded once without checkpointing
    and once with it); the shapes the fit set lacks come first, so that a run cut short by its time budget
    still measures them, and within a group the largest step comes last (an out-of-memory failure there
    costs the others nothing). The in-sample cases run the trainer loop (the recipe the estimate was built
    on); the out-of-sample ones the plain loop, and a few the trainer loop too, to tell the loop's share of
    an error from the shape's."""
    found: list[Case] = []
    for shape in ("tinyllama-1.1b", "qwen2.5-1.5b"):
        for variant in VARIANTS:
            found += [Case(shape, variant, b, s, "out") for b, s in ((1, 2048), (4, 1024))]
        found += [Case(shape, variant, 1, 2048, "out", "trainer") for variant in ("none", "reentrant")]
    found.append(Case("tinyllama-1.1b", "reentrant", 8, 512, "out"))
    found.append(Case("tinyllama-1.1b", "reentrant", 3, 1000, "out"))  # sizes that are no multiple of 2 MiB
    found.append(Case("qwen2.5-1.5b", "none", 2, 1000, "out"))
    found.append(Case("qwen2.5-1.5b", "none", 1, 2048, "out", use_cache=False))  # as QLoRA notebooks set it
    fit_shapes = ((1, 1024), (1, 2048), (4, 1024), (4, 2048))
    for shape in ("llama-3.2-1b", "mistral-7b-v0.1", "llama-3.1-8b"):
        if shape == "mistral-7b-v0.1":
            for variant in VARIANTS:
                found += [Case(shape, variant, b, s, "out") for b, s in ((1, 2048), (4, 1024))]
            found.append(Case(shape, "none", 4, 1024, "out", "trainer", use_cache=False))
            continue
        for variant in ("none", "non-reentrant"):
            found += [Case(shape, variant, b, s, "in", "trainer") for b, s in fit_shapes]
        found += [Case(shape, "reentrant", b, s, "out") for b, s in ((1, 2048), (4, 1024))]
        found += [Case(shape, variant, 2, 1536, "out") for variant in ("non-reentrant", "none")]
    return found


def smoke_cases() -> list[Case]:
    return [
        Case("tiny-llama", "none", 2, 64, "in", "trainer"),
        Case("tiny-llama", "non-reentrant", 2, 64, "in", "trainer"),
        Case("tiny-qwen2", "reentrant", 2, 64, "out"),
        Case("tiny-qwen2", "none", 1, 128, "out"),
    ]


def write_config(shape: str, root: Path) -> Path:
    """The shape's ``config.json`` in ``root/shape`` (what ``gpumem estimate --arch PATH`` reads)."""
    from transformers import AutoConfig

    arch, fields = SHAPES[shape]
    path = root / shape
    if not (path / "config.json").is_file():
        AutoConfig.for_model(arch, **fields).save_pretrained(path)
    return path


# -- measuring on the GPU

DEVICE = "cuda:0"
"""Where ``--measure`` makes, loads and trains the models (a test points it at the CPU)."""


def make_checkpoint(shape: str, root: Path) -> Path:
    """A random-weight bfloat16 checkpoint of ``shape`` in ``root``, made on the GPU (seconds, even for 8B)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch, fields = SHAPES[shape]
    path = root / shape
    if (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file():
        return path
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **fields), dtype=torch.bfloat16)
    model.save_pretrained(path)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return path


def load_prepared(path: Path, gradient_checkpointing: bool) -> Any:
    """The standard recipe's model: ``from_pretrained`` with nf4, then peft's kbit preparation with its
    defaults (reentrant checkpointing where on), then LoRA r16 on all linear layers."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    model = AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, dtype=torch.bfloat16, device_map={"": DEVICE}
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    torch.manual_seed(0)
    config = LoraConfig(r=16, target_modules="all-linear", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def set_variant(model: Any, variant: str) -> None:
    """Switch a model prepared with checkpointing to ``variant``: as ``prepare_model_for_kbit_training``
    with ``gradient_checkpointing_kwargs={"use_reentrant": False}`` would have left it (the input embeddings'
    output requires grad either way)."""
    kwargs: dict[str, bool] = {} if variant == "reentrant" else {"use_reentrant": False}
    with _quiet():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _frames(event: dict[str, Any], depth: int = 6) -> list[str]:
    """The Python frames of an allocation, innermost first, without the dispatch machinery."""
    out = []
    for frame in event.get("frames") or []:
        filename = str(frame.get("filename", ""))
        if "torch/utils/_python_dispatch" in filename or "torch/_ops.py" in filename:
            continue
        short = "/".join(filename.split("/")[-2:])
        out.append(f"{short}:{frame.get('line')}:{frame.get('name')}")
        if len(out) == depth:
            break
    return out or ["(no Python frame: the autograd engine's thread)"]


def live_at_peak(snapshot: dict[str, Any], before: int) -> dict[str, Any]:
    """From the allocator's history of one step: the allocated peak it replays to, and what was alive then
    (the largest blocks with their frames, and the bytes per innermost frame). ``before``: bytes allocated
    when the history began (their blocks are not in it)."""
    traces = snapshot.get("device_traces") or [[]]
    events = traces[0]
    live: dict[int, dict[str, Any]] = {}
    untracked = before
    current = before
    peak, peak_index = before, -1
    for i, event in enumerate(events):
        action, addr, size = event.get("action"), event.get("addr"), int(event.get("size") or 0)
        if action == "alloc":
            live[addr] = event
            current += size
            if current > peak:
                peak, peak_index = current, i
        elif action == "free_requested":
            if live.pop(addr, None) is None:
                untracked -= size
            current -= size
    # Replay again up to the peak: the blocks alive at that moment.
    live = {}
    untracked = before
    for event in events[: peak_index + 1]:
        action, addr, size = event.get("action"), event.get("addr"), int(event.get("size") or 0)
        if action == "alloc":
            live[addr] = event
        elif action == "free_requested" and live.pop(addr, None) is None:
            untracked -= size
    blocks = sorted(live.values(), key=lambda e: -int(e.get("size") or 0))
    groups: dict[str, list[int]] = {}
    for event in blocks:
        key = _frames(event, 1)[0]
        group = groups.setdefault(key, [0, 0])
        group[0] += int(event.get("size") or 0)
        group[1] += 1
    return {
        "replayed_peak": peak,
        "resident_at_peak": untracked,  # of what was allocated before the step, still alive at its peak
        "made_in_step_at_peak": peak - untracked,
        "events": len(events),
        "peak_event": _frames(events[peak_index], 10) if peak_index >= 0 else [],
        "largest": [{"bytes": int(e.get("size") or 0), "frames": _frames(e)} for e in blocks[:30]],
        "by_frame": [
            {"frame": k, "bytes": v[0], "blocks": v[1]} for k, v in sorted(groups.items(), key=lambda g: -g[1][0])
        ][:25],
    }


def measure_case(model: Any, case: Case, history: bool) -> dict[str, Any]:
    """Two steps of ``case`` on ``model``; the second one's peaks (and, with ``history``, what made it)."""
    import torch

    from pytest_gpumem.models import training

    row: dict[str, Any] = {}

    @contextlib.contextmanager
    def phase(name: str) -> Iterator[None]:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        record = history and name == "step2"
        if record:
            try:
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python", clear_history=True)
            except TypeError:  # a torch without clear_history
                torch.cuda.memory._record_memory_history(max_entries=2_000_000, stacks="python")
        try:
            yield
        finally:
            torch.cuda.synchronize()
            if name == "step2":
                row.update(
                    peak=torch.cuda.max_memory_allocated(),
                    reserved=torch.cuda.max_memory_reserved(),
                    resident=before,
                    retries=torch.cuda.memory_stats().get("num_alloc_retries", 0),
                )
            if record:
                snapshot = torch.cuda.memory._snapshot()
                torch.cuda.memory._record_memory_history(enabled=None)
                row["at_peak"] = live_at_peak(snapshot, before)

    with _quiet():
        if case.loop == "trainer":
            training.train_steps(model, batch=case.batch, seq=case.seq, steps=2, phase=phase)
        else:
            plain_loop(model, case.batch, case.seq, 2, phase)
    return row


def plain_loop(model: Any, batch: int, seq: int, steps: int, phase: Any) -> None:
    """The training loop of the tutorials, written as a user writes it: the outputs (and so the logits)
    stay referenced through backward, and until the next step's forward pass has returned. ``from_pretrained``
    returns the model in eval mode, where checkpointing recomputes nothing; the tutorials' loop calls
    ``model.train()`` first."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for step in range(1, steps + 1):
        with phase(f"step{step}"):
            input_ids = torch.randint(0, vocab, (batch, seq), generator=generator).to(DEVICE)
            outputs = model(input_ids=input_ids, labels=input_ids)
            loss = outputs.loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()


def measure(selected: list[Case], model_dir: Path, json_path: Path, history: bool, budget: float) -> None:
    """Run ``selected`` on the GPU, writing the raw figures to ``json_path`` after every case."""
    import torch

    from pytest_gpumem.measure.meters.cuda import _warm_up, _warm_up_bitsandbytes

    started = time.perf_counter()
    _warm_up(DEVICE)
    _warm_up_bitsandbytes(DEVICE)
    free, total = torch.cuda.mem_get_info()
    raw: dict[str, Any] = {
        "header": fields(),
        "device": torch.cuda.get_device_name(0),
        "capability": list(torch.cuda.get_device_capability(0)),
        "memory": total,
        "workspace": torch.cuda.memory_allocated(),
        "context": total - free - torch.cuda.memory_reserved(),
        "cases": {},
    }

    def flush() -> None:
        raw["seconds"] = round(time.perf_counter() - started, 1)
        write(json_path, json.dumps(raw, indent=1, sort_keys=True))

    for shape in dict.fromkeys(c.shape for c in selected):
        mine = [c for c in selected if c.shape == shape]
        try:
            path = make_checkpoint(shape, model_dir)
        except Exception as exc:  # noqa: BLE001 - recorded, and the other shapes still run
            for case in mine:
                raw["cases"][case.name] = {**asdict(case), "status": "error", "error": _error(exc)}
            flush()
            continue
        for with_checkpointing in (False, True):
            group = [c for c in mine if (c.variant != "none") == with_checkpointing]
            if not group:
                continue
            model = None
            try:
                base = torch.cuda.memory_allocated()
                model = load_prepared(path, with_checkpointing)
                # Reentrant first (as prepared), then non-reentrant; the largest step of each last.
                for case in sorted(group, key=lambda c: (-VARIANTS.index(c.variant), c.batch * c.seq)):
                    row: dict[str, Any] = {**asdict(case), "base": base}
                    if time.perf_counter() - started > budget:
                        row["status"] = "skipped: over the time budget"
                    else:
                        case_started = time.perf_counter()
                        try:
                            model.config.use_cache = case.use_cache
                            if case.variant == "non-reentrant":
                                set_variant(model, case.variant)
                            row.update(measure_case(model, case, history), status="ok")
                        except torch.OutOfMemoryError:
                            row["status"] = "oom"
                        except Exception as exc:  # noqa: BLE001
                            row.update(status="error", error=_error(exc))
                        row["seconds"] = round(time.perf_counter() - case_started, 1)
                        torch.cuda.memory._record_memory_history(enabled=None)
                        model.zero_grad(set_to_none=True)
                        gc.collect()
                        torch.cuda.empty_cache()
                    raw["cases"][case.name] = row
                    summary = {k: row.get(k) for k in ("status", "peak", "reserved", "resident", "seconds")}
                    print(f"{case.name}: {summary}", file=sys.stderr, flush=True)
                    flush()
            except Exception as exc:  # noqa: BLE001 - the load failed: every case of the group says why
                for case in group:
                    raw["cases"].setdefault(case.name, {**asdict(case), "status": "error", "error": _error(exc)})
                flush()
            finally:
                del model
                gc.collect()
                torch.cuda.empty_cache()
        shutil.rmtree(path, ignore_errors=True)  # 16 GB for 8B: the disk holds one at a time
    flush()


def _error(exc: BaseException) -> str:
    text = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    return text[-2000:]


# -- estimating and scoring, anywhere


def recipe_of(case: Case, config_root: Path) -> Any:
    """The estimate's recipe for ``case``: the shape's config file, nf4, LoRA r16 all-linear, AdamW."""
    from pytest_gpumem.estimate import engine

    return engine.Recipe(
        config=write_config(case.shape, config_root),
        batch=case.batch,
        seq=case.seq,
        gradient_checkpointing=case.variant != "none",
        checkpointing=case.variant if case.variant != "none" else "reentrant",
        loop=case.loop,
        use_cache=case.use_cache,
    )


def estimates(selected: list[Case], gpu_name: str, config_root: Path) -> dict[str, dict[str, Any]]:
    """Every case estimated on fake tensors for ``gpu_name``: the allocated peak (workspaces included), the
    allocator model's segments at the peak (before any fitted share), what was allocated when the step
    began (workspaces included, as the measurement counts it)."""
    from pytest_gpumem.core import gpus
    from pytest_gpumem.estimate import engine

    gpu = gpus.find_gpu(gpu_name, "--gpu")
    rows: dict[str, dict[str, Any]] = {}
    coded, gpus.FRAGMENTATION = gpus.FRAGMENTATION, 0.0  # the segments alone: the share is fitted here
    try:
        for case in selected:
            started = time.perf_counter()
            step = engine.run_step(recipe_of(case, config_root), gpu, attribute=False)
            rows[case.name] = {
                "peak": step.peak,
                "segments": step.reserved,
                "resident": step.resident + gpu.workspace,
                "seconds": round(time.perf_counter() - started, 2),
            }
            print(f"estimated {case.name}: {rows[case.name]}", file=sys.stderr, flush=True)
    finally:
        gpus.FRAGMENTATION = coded
    return rows


def speed(gpu_name: str) -> dict[str, Any]:
    """What ``gpumem estimate`` costs: the 8B estimate (batch 1 x seq 2048, checkpointing, without the levers)
    in a child process on this machine; its wall seconds (imports included) and its own peak RSS."""
    code = (
        "import resource; from pytest_gpumem import estimate, gpus; "
        "r = engine.Recipe(size='8b', batch=1, seq=2048, gradient_checkpointing=True); "
        f"engine.estimate(r, gpus.find_gpu({gpu_name!r}, 'gpu'), advise=False); "
        "u = resource.getrusage(resource.RUSAGE_SELF); print(u.ru_maxrss, u.ru_utime + u.ru_stime)"
    )
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - started
    rss, cpu = done.stdout.split()[-2:]
    # ru_maxrss is in kilobytes on Linux; the CPU time shows the cost where other work shares the machine.
    return {"seconds": wall, "cpu_seconds": float(cpu), "rss": int(rss) * 1024, "load": os.getloadavg()[0]}


def error(estimated: int, measured: int) -> float:
    return (estimated - measured) / measured


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def fit_fragmentation(pairs: list[tuple[int, int, int]]) -> float:
    """The share of the allocated peak, added to the allocator model's segments, that makes the median
    reserved error on ``pairs`` (estimated peak, segments, measured reserved) zero: the in-sample cases."""
    return median([(reserved - segments) / peak for peak, segments, reserved in pairs])


def score(
    real: dict[str, Any], guesses: dict[str, dict[str, Any]], selected: list[Case], fragmentation: float
) -> dict[str, Any]:
    """Rows of the comparison and each set's summary (largest error, counts within 3% and 5%)."""
    from pytest_gpumem.core.gpus import whole_segments

    rows = []
    for case in selected:
        measured = real["cases"].get(case.name)
        guess = guesses.get(case.name)
        if measured is None or guess is None:
            continue
        row: dict[str, Any] = {"case": case.name, "sample": case.sample, "status": measured.get("status")}
        reserved = max(guess["segments"] + int(guess["peak"] * fragmentation), whole_segments(guess["peak"]))
        row.update(estimated=guess["peak"], reserved_estimated=reserved)
        row["resident_estimated"] = guess["resident"]
        if measured.get("status") == "ok":
            row.update(measured=measured["peak"], reserved_measured=measured["reserved"])
            row["resident_measured"] = measured.get("resident")
            row["error"] = error(guess["peak"], measured["peak"])
            row["reserved_error"] = error(reserved, measured["reserved"])
        rows.append(row)
    summary = {}
    for sample in ("in", "out"):
        errors = [r["error"] for r in rows if r["sample"] == sample and "error" in r]
        reserved_errors = [abs(r["reserved_error"]) for r in rows if r["sample"] == sample and "error" in r]
        summary[sample] = {
            "cases": len(errors),
            "largest": max((abs(e) for e in errors), default=0.0),
            "mean_abs": sum(abs(e) for e in errors) / len(errors) if errors else 0.0,
            "under": sum(1 for e in errors if e < 0),
            "within_3": sum(1 for e in errors if abs(e) <= 0.03),
            "within_5": sum(1 for e in errors if abs(e) <= 0.05),
            "reserved_largest": max(reserved_errors, default=0.0),
            "reserved_median": median(reserved_errors),
        }
    return {"rows": rows, "summary": summary}


def table(scored: dict[str, Any], sample: str) -> list[str]:
    lines = [
        "| case | measured | estimated | error | reserved measured | reserved modelled | error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in (r for r in scored["rows"] if r["sample"] == sample):
        if "error" not in row:
            status = "OOM" if row["status"] == "oom" else str(row["status"]).split(":")[0]
            lines.append(f"| {row['case']} | {status} | {row['estimated'] / GiB:.3f} GiB | - | - | - | - |")
            continue
        lines.append(
            f"| {row['case']} | {row['measured'] / GiB:.3f} GiB | {row['estimated'] / GiB:.3f} GiB "
            f"| {row['error']:+.2%} | {row['reserved_measured'] / GiB:.3f} GiB "
            f"| {row['reserved_estimated'] / GiB:.3f} GiB | {row['reserved_error']:+.1%} |"
        )
    s = scored["summary"][sample]
    lines += [
        "",
        f"Peak allocated: largest error {s['largest']:.2%}, mean {s['mean_abs']:.2%}; {s['within_3']} of "
        f"{s['cases']} within 3%, {s['within_5']} within 5%; {s['under']} under-predicted. "
        f"Reserved (modelled): largest error {s['reserved_largest']:.1%}, median {s['reserved_median']:.1%}.",
    ]
    return lines


def report(real: dict[str, Any], guesses: dict[str, dict[str, Any]], selected: list[Case], gpu: str) -> tuple[str, Any]:
    from pytest_gpumem.core import gpus

    fit_pairs = [
        (guesses[c.name]["peak"], guesses[c.name]["segments"], real["cases"][c.name]["reserved"])
        for c in selected
        if c.sample == "in" and real["cases"].get(c.name, {}).get("status") == "ok" and c.name in guesses
    ]
    fitted = fit_fragmentation(fit_pairs)
    scored = score(real, guesses, selected, fitted)
    runs = "; ".join(
        f"`{h.get('command', '?')}` (commit {h.get('commit', '?')}; {h.get('software', '?')}; {h.get('machine', '?')})"
        for h in real.get("headers", [])
    )
    coded = "" if abs(fitted - gpus.FRAGMENTATION) < 0.0005 else " (differs: update gpus.FRAGMENTATION)"
    lines = [
        f"Measured on {real.get('device', '?')} by {runs or 'nothing (smoke run)'}; estimated for {gpu} here. "
        "Peak allocated of the measured step, absolute (model, optimizer state and cuBLAS workspaces "
        "included); 1 GiB = 2^30 bytes. Error = (estimated - measured) / measured. No constant is fitted "
        "to the allocated peak.",
        "",
        "Reserved is modelled, not gated on: the segments of a model of the CUDA caching allocator that "
        "replays the step's allocations, plus a share of the allocated peak fitted on the in-sample cases only "
        f"({fitted:+.2%}; the code's FRAGMENTATION is {gpus.FRAGMENTATION:+.2%}{coded}).",
        "",
        "## In-sample (the recipe the estimate was built on, Trainer-like loop; the reserved share is fitted here)",
        "",
        *table(scored, "in"),
        "",
        "## Out-of-sample (other shapes, the reentrant variant, the plain loop, other batch and sequence shapes)",
        "",
        *table(scored, "out"),
        "",
    ]
    return "\n".join(lines), {"fitted_fragmentation": fitted, **scored}


def read_real(paths: list[Path]) -> dict[str, Any]:
    """The cases of one or more ``--measure`` runs, which must come from the same kind of GPU."""
    runs = [json.loads(path.read_text(encoding="utf-8")) for path in paths]
    devices = {run.get("device") for run in runs}
    if len(devices) != 1:
        raise SystemExit(f"estimate_accuracy.py --real: runs from different GPUs ({', '.join(map(str, devices))})")
    merged: dict[str, Any] = {**runs[0], "cases": {}}
    merged["headers"] = [run.get("header", {}) for run in runs]
    for run in runs:
        for row in run["cases"].values():
            row.setdefault("loop", "trainer")  # the runs before the plain loop ran Trainer's
            row.setdefault("use_cache", True)
            case = Case(
                row["shape"], row["variant"], row["batch"], row["seq"], row["sample"], row["loop"], row["use_cache"]
            )
            merged["cases"][case.name] = row
    return merged


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--measure", action="store_true", help="run every case on this machine's GPU")
    parser.add_argument(
        "--real", type=Path, action="append", help="a --measure run's JSON (repeatable): estimate and score its cases"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models, estimate path only, CPU, seconds")
    parser.add_argument("--only", default="", help="comma-separated shapes to keep (default: every shape)")
    parser.add_argument("--gpu", default=None, help="the GPU to estimate for (default: the measured one's name)")
    parser.add_argument("--json", type=Path, help="--measure: the raw figures; else: the scored numbers")
    parser.add_argument("--out", type=Path, help="the Markdown results file")
    parser.add_argument("--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "gpumem-estimate-models")
    parser.add_argument("--no-history", action="store_true", help="--measure without the allocator's history")
    parser.add_argument("--budget", type=float, default=480.0, help="--measure: seconds before cases are skipped")
    args = parser.parse_args()
    title = "Estimate backend: accuracy in and out of sample"
    # The header's facts before anything is written: the commit is then clean of this run's own files.
    opening, facts = header(title), fields()

    selected = smoke_cases() if args.smoke else cases()
    if args.only:
        keep = set(args.only.split(","))
        selected = [c for c in selected if c.shape in keep]
    if args.measure:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("estimate_accuracy.py --measure: no CUDA GPU here (torch.cuda.is_available() is False)")
        if args.json is None:
            raise SystemExit("estimate_accuracy.py --measure: give --json, where the raw figures go")
        args.model_dir.mkdir(parents=True, exist_ok=True)
        measure(selected, args.model_dir, args.json, not args.no_history, args.budget)
        return
    with tempfile.TemporaryDirectory(prefix="gpumem-configs-") as configs:
        if args.smoke:
            gpu = args.gpu or "H200"
            guesses = estimates(selected, gpu, Path(configs))
            # The smoke run has no GPU to compare with: its "measurement" is the estimate itself, which
            # checks the scoring and the report, not the accuracy.
            real: dict[str, Any] = {
                "device": "none (smoke)",
                "cases": {
                    c.name: {"status": "ok", "peak": guesses[c.name]["peak"], "reserved": guesses[c.name]["segments"]}
                    for c in selected
                },
            }
            out = smoke_out("estimate-accuracy.md")
        else:
            if args.real is None:
                raise SystemExit("estimate_accuracy.py: give --real (a --measure run's JSON) or --measure or --smoke")
            real = read_real(args.real)
            gpu = args.gpu or ("H200" if "H200" in str(real.get("device")) else "H100")
            # The cases the run measured, as it recorded them (shape, variant, batch, seq, set).
            selected = [
                Case(
                    row["shape"], row["variant"], row["batch"], row["seq"], row["sample"], row["loop"], row["use_cache"]
                )
                for row in real["cases"].values()
                if not args.only or row["shape"] in args.only.split(",")
            ]
            guesses = estimates(selected, gpu, Path(configs))
            out = args.out
        text, numbers = report(real, guesses, selected, gpu)
    if not args.smoke:
        cost = speed(gpu)
        numbers["speed"] = cost
        text += (
            "\n## Speed\n\nOne estimate of an 8B QLoRA step (batch 1 x seq 2048, checkpointing, no levers), in a "
            f"child process of this run: {cost['seconds']:.1f} s wall, {cost['cpu_seconds']:.1f} s of CPU time "
            f"(imports included), peak RSS {cost['rss'] / GiB:.2f} GiB, on the machine in the header (load "
            f"average {cost['load']:.1f} when it ran).\n"
        )
    print(text)
    if out is not None:
        write(out, opening + "\n" + text)
    if args.json is not None and not args.smoke:
        write(args.json, json.dumps({"header": facts, **numbers}, indent=1))
    if args.smoke:
        assert out is not None
        check_written(out, title)


if __name__ == "__main__":
    main()
