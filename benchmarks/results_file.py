"""A results file is written whole by the script that measured it.

Every file under ``benchmarks/results/`` starts with the same header: the exact
command that wrote it, the commit (``-dirty`` when the tree had changes), the
software that changes memory, and the machine. A figure without that header
cannot be traced to a run, so no script writes one, and nobody edits one by hand.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

SOFTWARE = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pytest")
COMMIT_ENV = "GPUMEM_BENCH_COMMIT"
"""Names the commit of a tree copied to another machine; it wins over that copy's own ``.git``."""


def command() -> str:
    """The command line that runs this script, as a user would type it again."""
    return shlex.join(["python", *sys.argv])


def commit() -> str:
    """The commit the measured tree is: ``GPUMEM_BENCH_COMMIT`` where it is set (a copy of the tree sent to a
    GPU machine, whose own ``.git``, if any, may be of another commit), else the checked-out commit, with
    ``-dirty`` when tracked files differ from it."""
    given = os.environ.get(COMMIT_ENV, "").strip()
    if given:
        return f"{given} (from {COMMIT_ENV})"
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        try:
            done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        except OSError:  # no git on this machine
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD")
    if not head:
        return "unknown"
    return head + ("-dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


def software() -> str:
    """Python and the versions of the libraries that decide how much memory a step takes."""
    parts = [f"python {platform.python_version()}"]
    for name in SOFTWARE:
        try:
            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return ", ".join(parts)


def machine() -> str:
    """The GPUs where CUDA sees any, else the CPU, and the core count either way."""
    cores = f"{os.cpu_count()} CPU cores"
    try:
        import torch

        if torch.cuda.is_available():
            names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            return f"{len(names)}x {names[0]} ({torch.version.cuda and 'CUDA ' + torch.version.cuda}), {cores}"
    except ImportError:
        pass
    return f"no GPU, {platform.processor() or platform.machine()}, {cores}"


def fields() -> dict[str, str]:
    """The header's facts, for the top level of a JSON results file."""
    return {"command": command(), "commit": commit(), "software": software(), "machine": machine()}


def header(title: str) -> str:
    """The lines that open every results file: a title, then command, commit, software and machine."""
    return (
        f"# {title}\n\n"
        f"- command: `{command()}`\n"
        f"- commit: {commit()}\n"
        f"- software: {software()}\n"
        f"- machine: {machine()}\n"
    )


def write(path: Path, text: str) -> None:
    """Write ``text`` as the whole of ``path``, atomically: a reader sees the old file or the new one."""
    from pytest_gpumem.core.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text if text.endswith("\n") else text + "\n")


def aligned_table(rows: list[list[str]]) -> list[str]:
    """A Markdown table whose columns line up in plain text too; the first row is the heading."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for i, cells in enumerate(rows):
        lines.append("| " + " | ".join(cell.ljust(w) for cell, w in zip(cells, widths, strict=True)) + " |")
        if i == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return lines


def publish(body: str, out: Path | None, title: str) -> None:
    """Print ``body`` and, with ``out``, write it there whole under the header: the file holds what the
    script printed and nothing else."""
    body = body if body.endswith("\n") else body + "\n"
    sys.stdout.write(body)
    sys.stdout.flush()
    if out is not None:
        write(out, header(title) + "\n" + body)


def apply_smoke(parser: argparse.ArgumentParser, options: argparse.Namespace, smoke: dict[str, Any], name: str) -> None:
    """With ``--smoke``: the script's smoke settings, and its results file ``name`` in a temporary directory
    (an ``--out`` given as well is an error: a smoke run never writes into ``benchmarks/results``)."""
    if not options.smoke:
        return
    if options.out is not None:
        parser.error("--smoke writes to a temporary file; leave out --out")
    for key, value in smoke.items():
        setattr(options, key, value)
    options.out = smoke_out(name)


def smoke_out(name: str) -> Path:
    """Where a ``--smoke`` run writes its results file: a fresh temporary directory, never
    ``benchmarks/results``."""
    return Path(tempfile.mkdtemp(prefix="gpumem-smoke-")) / name


def check_written(path: Path, title: str) -> None:
    """A ``--smoke`` run's last check: the file it wrote opens with the header and holds a table."""
    text = path.read_text(encoding="utf-8")
    opening = f"# {title}\n\n- command: `"
    if not text.startswith(opening) or "\n- machine: " not in text or "\n|" not in text:
        raise SystemExit(f"{path}: not a results file (no header, or no table):\n{text[:400]}")
    print(f"smoke: wrote {path} ({len(text)} characters, header and table)", file=sys.stderr)
