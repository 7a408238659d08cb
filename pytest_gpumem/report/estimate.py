"""The ``gpumem estimate`` table: one predicted training step, its attribution, the fit and the levers."""

from __future__ import annotations

from collections.abc import Sequence

from pytest_gpumem.core.sample import CONSUMERS
from pytest_gpumem.core.units import format_bytes
from pytest_gpumem.estimate.engine import Estimate


def _aligned(rows: Sequence[tuple[str, ...]], right: tuple[int, ...] = (1,)) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  ".join(
            cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ).rstrip()
        for row in rows
    ]


def lines(result: Estimate) -> list[str]:
    """The estimate as terminal lines: setup, the peak and what surrounds it, the consumers, the verdict on
    the GPU, and the levers (with the recommendation where it does not fit)."""
    gpu = result.gpu
    out = [f"gpumem estimate: {result.recipe.describe()} on {gpu.name} ({format_bytes(gpu.memory)})"]
    if result.method == "analytic":
        out.append(
            f"ANALYTIC ESTIMATE (layer formula, nothing ran; exit status 4): {result.reason}; every figure below, "
            "the levers' too, comes from the formula"
        )
    if result.assumed:
        out.append("recipe assumed:")
        out += [f"  - {line}" for line in result.assumed]
    peak = result.peak
    rows: list[tuple[str, ...]] = [
        ("peak allocated", format_bytes(peak), "the step's peak of live tensors, resident model included"),
        ("  resident", format_bytes(result.resident), "allocated before the step (model, optimizer state)"),
        (
            "reserved",
            format_bytes(result.reserved),
            "modelled: the caching allocator's segments, its rules replayed over the step"
            if result.method == "fake"
            else "formula: the peak in whole 2 MiB segments (a lower bound)",
        ),
        ("device", format_bytes(result.device), "reserved + CUDA context and libraries (what nvidia-smi shows)"),
    ]
    if result.attribution is not None:
        breakdown = result.attribution.peak
        where = " / ".join(part for part in (result.attribution.stage, result.attribution.module) if part)
        rows.append(("at the peak", "", where))
        for name in CONSUMERS:
            value = getattr(breakdown, name)
            share = f"{value / peak:.0%}" if peak else "-"
            rows.append((f"  {name}", format_bytes(value), share))
        rows.append(("  cuBLAS workspaces", format_bytes(gpu.workspace), ""))
    out += _aligned(rows)
    if result.fits:
        out.append(f"fits: {format_bytes(gpu.memory - result.device)} to spare on {gpu.name}")
    else:
        out.append(f"DOES NOT FIT: needs {format_bytes(result.needed)} more than {gpu.name} has")
    out += [f"note: {finding}" for finding in result.findings]
    if result.levers:
        legend = (
            "'formula' = the analytic formula with the lever applied"
            if result.method == "analytic"
            else "'estimated-run' = the recipe estimated again with the lever"
        )
        out.append(f"levers (saving on the peak; {legend}):")
        lever_rows = [
            (
                ("* " if lever.key in result.recommended else "  ") + lever.key,
                format_bytes(lever.saving),
                lever.source,
                lever.action,
            )
            for lever in result.levers
        ]
        out += _aligned(lever_rows)
        if result.recommended:
            out.append(f"recommended (*): {', '.join(result.recommended)}")
    out.append(gpu.provenance())
    out.append(f"sizes in binary units (1 GiB = 2^30 bytes); estimated in {result.seconds:.1f} s without a GPU")
    return out
