"""A results file is written whole by the script that measured it.

Every file under ``benchmarks/results/`` starts with the same header: the exact
command that wrote it, the commit (``-dirty`` when the tree had changes), the
software that changes memory, and the machine. A figure without that header
cannot be traced to a run, so no script writes one, and nobody edits one by hand.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

SOFTWARE = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "pytest")


def command() -> str:
    """The command line that runs this script, as a user would type it again."""
    return shlex.join(["python", *sys.argv])


def commit() -> str:
    """The checked-out commit, with ``-dirty`` when tracked files differ from it."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short=12", "HEAD") or "unknown"
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
    from pytest_gpumem.atomic import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text if text.endswith("\n") else text + "\n")
