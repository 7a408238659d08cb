"""Advice for a user's own tests, which register nothing: each lever's number against that lever run for real.

``benchmarks/own_tests`` holds three tests as users write them (a 1B QLoRA loop over a 16 GiB budget; the
same with checkpointing enabled and the model left in eval mode; an 8B bf16 forward at batch 16 under a
16 GiB device limit), and beside each, the test with one lever pulled. One pytest run measures them all
under the plugin. For every lever the advisor gave an as-is test, the table holds its saving (replayed on
fake tensors, or estimated), the saving measured by running its variant for real (the as-is test's peak
less the variant's; for the test that ran out of memory, its peak run again without the limit; for the
levers the advisor counts with the test's fix in, the fixed test's peak less the fixed variant's), their
difference, and whether the levers rank the same both ways (two savings within 1% of each other are a
tie, whose order says nothing).

    python benchmarks/unregistered.py --out benchmarks/results/unregistered-h200.md   # a CUDA GPU, ~6 min
    python benchmarks/unregistered.py --smoke    # CI: without a GPU the suite skips; the table says so
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest_subprocess
from results_file import aligned_table, apply_smoke, check_written, publish

from pytest_gpumem.core.sample import Sample

ROOT = Path(__file__).resolve().parent.parent
SUITE = "benchmarks/own_tests"
TITLE = "Advice for a user's own tests: each lever's number against the lever run for real"
SMOKE = {"select": "qlora__as_is"}
GIB = 2**30
FIXES = {"use_cache": "fix_use_cache", "inference_mode": "fix_inference_mode"}
"""The variant that fixes a finding, by a word of the fix's action."""
SHARED = {("qlora_eval", "fix"): "qlora__checkpointing"}
"""Variants one case borrows from another: the eval-mode case fixed is the loop with checkpointing working."""
UNLIMITED = "forward8b__unlimited"
AFTER_FIX = {("forward8b", "weights8"), ("forward8b", "weights4")}
"""Levers counted for the test once its fix is in (the advisor says so): their variants run fixed too, and
their real saving is against the fixed test."""


def variant(case: str, lever: dict[str, Any]) -> str | None:
    """The variant test (its name less ``test_``) that pulls ``lever`` in ``case``; None where none does."""
    if (case, lever["key"]) in SHARED:
        return SHARED[(case, lever["key"])]
    if lever["key"] == "fix":
        word = next((w for w in FIXES if w in lever["action"]), None)
        return f"{case}__{FIXES[word]}" if word else None
    return f"{case}__{lever['key']}"


def absolute(test: dict[str, Any]) -> int:
    """A test's allocated peak with what was resident before it, on its fullest device."""
    return Sample.from_dict(test["sample"]).absolute_peak("allocated")


def gib(n: float) -> str:
    return f"{n / GIB:.2f}"


def rank(pairs: list[tuple[str, int]]) -> list[str]:
    return [key for key, _ in sorted(pairs, key=lambda pair: -pair[1])]


def sign(n: float) -> int:
    return (n > 0) - (n < 0)


TIE = 0.01  # savings within 1% of each other are a tie: their order says nothing


def rank_agreement(predicted: list[tuple[str, int]], real: list[tuple[str, int]]) -> str:
    """Whether every two levers are in the same order by predicted and by real saving: "yes", "no", or "yes,
    but for ties" naming the pairs whose order differs only where one of the two ways saves the same within
    :data:`TIE`."""
    first, second = dict(predicted), dict(real)
    ties = []
    for i, (a, _) in enumerate(predicted):
        for b, _ in predicted[i + 1 :]:
            by_predicted, by_real = first[a] - first[b], second[a] - second[b]
            if sign(by_predicted) == sign(by_real):
                continue
            tied = abs(by_predicted) <= TIE * max(abs(first[a]), abs(first[b])) or abs(by_real) <= TIE * max(
                abs(second[a]), abs(second[b])
            )
            if not tied:
                return "no"
            ties.append(f"{a} = {b}")
    return f"yes, but for ties within {TIE:.0%} ({', '.join(ties)})" if ties else "yes"


def tables(tests: dict[str, dict[str, Any]]) -> str:
    rows = [["test", "lever", "source", "predicted GiB", "real GiB", "difference", "variant"]]
    notes: list[str] = []
    worst: dict[str, float] = {}
    for name, test in tests.items():
        if not name.endswith("__as_is") or not test.get("advice"):
            continue
        case = name.removesuffix("__as_is")
        advice = test["advice"]
        reference = tests.get(UNLIMITED) if test["verdict"]["status"] == "oom" else test
        predicted, real = [], []
        for lever in advice["levers"]:
            other = variant(case, lever)
            ran = tests.get(other) if other else None
            fixed = tests.get(f"{case}__{FIXES['inference_mode']}")
            against = fixed if (case, lever["key"]) in AFTER_FIX else reference
            saved = absolute(against) - absolute(ran) if ran is not None and against is not None else None
            if saved is None:
                cells = ["-", "-", f"no variant ({other})" if other else "no variant"]
            else:
                share = (lever["saving"] - saved) / saved if saved else 0.0
                worst[lever["source"]] = max(worst.get(lever["source"], 0.0), abs(share))
                cells = [gib(saved), f"{share:+.1%}", other or ""]
                predicted.append((lever["key"], lever["saving"]))
                real.append((lever["key"], saved))
            action = f"{lever['key']}: {lever['action'][:60]}"
            rows.append([name, action, lever["source"], gib(lever["saving"]), *cells])
        notes.append(
            f"- `{name}`: {test['verdict']['status']}; needed {gib(advice['needed'] or 0)} GiB; recommended "
            f"{' + '.join(advice['recommended']) or 'nothing'}; levers ranked the same by predicted and real "
            f"saving: {rank_agreement(predicted, real)} (predicted {', '.join(rank(predicted))}; "
            f"real {', '.join(rank(real))})"
        )
        for finding in advice["findings"]:
            notes.append(f"  - finding: {finding}")
        if advice.get("replay"):
            notes.append(f"  - {advice['replay']}")
    if len(rows) == 1:
        return "No as-is test was advised: the suite needs a CUDA GPU (it skipped here).\n\n" + "\n".join(
            aligned_table(rows)
        )
    summary = "; ".join(f"{source}: within {share:.1%}" for source, share in sorted(worst.items()))
    return "\n".join(
        [
            "Predicted: the advisor's saving for the as-is test. Real: the as-is test's allocated peak less the "
            "variant's, both run for real under the plugin (the out-of-memory test's peak is its run without "
            "the limit). Difference: (predicted - real) / real.",
            "",
            *aligned_table(rows),
            "",
            f"Largest difference by source: {summary or 'none compared'}.",
            "",
            *notes,
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--select", default="", help="a -k expression: run only these tests")
    parser.add_argument("--out", type=Path, help="also write the results file here")
    parser.add_argument("--smoke", action="store_true", help="CI: one test, a temporary --out")
    args = parser.parse_args()
    apply_smoke(parser, args, SMOKE, "unregistered.md")

    with tempfile.TemporaryDirectory(prefix="gpumem-own-") as work:
        out = Path(work) / "report.json"
        command = pytest_subprocess.command(
            SUITE, "-q", "-p", "no:cacheprovider", f"--gpumem-json={out}",
            f"--gpumem-baselines={Path(work) / 'baselines'}", *(["-k", args.select] if args.select else []),
        )  # fmt: skip
        print(shlex.join(command[1:]), file=sys.stderr)
        done = subprocess.run(command, cwd=ROOT, env=pytest_subprocess.environment(), capture_output=True, text=True)
        sys.stderr.write(done.stdout[-6000:])
        report = json.loads(out.read_text()) if out.exists() else {"tests": []}
    tests = {t["nodeid"].split("::test_")[-1]: t for t in report["tests"]}
    publish(tables(tests), args.out, TITLE)
    if args.smoke:
        check_written(args.out, TITLE)


if __name__ == "__main__":
    main()
