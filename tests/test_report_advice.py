"""Attribution and advice in the reporters, fed given numbers: table helpers, failure message, summary,
Markdown details block and JSON round trips."""

from __future__ import annotations

import pytest

from pytest_gpumem.core.sample import (
    LEVERS,
    Advice,
    Attribution,
    Baseline,
    Breakdown,
    Lever,
    Sample,
    TestResult,
    Verdict,
)
from pytest_gpumem.report import json_report, markdown, terminal
from pytest_gpumem.report.table import (
    LEVER_NAMES,
    attribution_rows,
    cells,
    grown_consumer,
    largest_consumer,
    lever_text,
    recommendation,
    top_lever,
    where,
)

MiB = 2**20
GiB = 2**30
HARDWARE = "NVIDIA-H100-80GB-HBM3"
ENV = {
    "backend": "cuda",
    "hardware": HARDWARE,
    "devices": ["cuda:0"],
    "software": {"torch": "2.6.0", "transformers": "4.57.6", "peft": "0.13.2"},
}

# The running example: a LoRA fine-tuning step whose activations grew by 1.25 GiB since the baseline.
BEFORE = Breakdown(
    weights=2 * GiB, gradients=256 * MiB, optimizer=512 * MiB, activations=4 * GiB, layer_activations=3 * GiB
)
NOW = Breakdown(
    weights=2 * GiB,
    gradients=256 * MiB,
    optimizer=512 * MiB,
    activations=5 * GiB + 256 * MiB,
    layer_activations=4 * GiB + 256 * MiB,
)
VALUE = NOW.total  # 8 GiB
BASE = BEFORE.total  # 6.75 GiB
ALLOWED = 144955146  # 2% of 6.75 GiB
NEEDED = 1181116006  # what the advisor says must go (1.10 GiB)
SNAPSHOT = "gpumem-snapshots/tests__test_train.py__test_lora_step.pickle"
FINDING = "gradient_checkpointing=True has no effect: use_cache=True turns it off in training"


def attribution(peak: Breakdown, **kwargs) -> Attribution:
    fields = {"device": "cuda:0", "phase": "step", "stage": "backward", "module": "model.layers.31.mlp"}
    return Attribution(peak=peak, **{**fields, **kwargs})


def levers() -> list[Lever]:
    """The advisor's levers for the running example, in :data:`LEVERS` order."""
    return [
        Lever(
            "batch",
            "per_device_train_batch_size 8 -> 4, gradient_accumulation_steps 1 -> 2",
            512 * MiB,
            "estimated",
            "activations halve with the batch",
        ),
        Lever(
            "checkpointing",
            "gradient_checkpointing=True, use_cache=False",
            7 * GiB // 2,
            "measured",
            "re-ran the step",
            estimated=15 * GiB // 4,
        ),
        Lever("seq", "max_seq_length 4096 -> 2048", 2 * GiB + 64 * MiB, "estimated", "layer activations halve"),
        Lever("bf16", "bf16=True", -256 * MiB, "measured", "fp32 master weights kept beside bf16 ones"),
        Lever("optimizer", "optim='adamw_bnb_8bit'", 0, "estimated"),
    ]


def advice(**kwargs) -> Advice:
    fields = {"findings": [FINDING], "levers": levers(), "needed": NEEDED, "recommended": ["checkpointing"]}
    return Advice(**{**fields, **kwargs})


def make(
    nodeid: str = "tests/test_train.py::test_lora_step",
    status: str = "regression",
    value: int | None = VALUE,
    baseline: int | None = BASE,
    *,
    now: Attribution | None = None,
    before: Attribution | None = None,
    advised: Advice | None = None,
    budget: int | None = None,
    allowed: int | None = ALLOWED,
    snapshot: str = "",
) -> TestResult:
    """A cuda TestResult on the ``allocated`` metric of ``cuda:0``."""
    sample = Sample(
        backend="cuda",
        before={"allocated": {"cuda:0": 0}},
        phases={"call": {"allocated": {"cuda:0": value}}} if value is not None else {},
        attribution=now,
    )
    stored = None
    if baseline is not None:
        stored = Baseline(
            metrics={"allocated": {"cuda:0": baseline}},
            phases={"call": {"allocated": {"cuda:0": baseline}}},
            software={"torch": "2.6.0", "transformers": "4.57.6"},
            recorded="2025-11-20",
            backend="cuda",
            attribution=before,
        )
    verdict = Verdict(
        status=status,
        metric="allocated",
        value=value,
        budget=budget,
        baseline=baseline,
        allowed=allowed if baseline is not None else None,
        tolerance="2%" if baseline is not None else "",
    )
    return TestResult(nodeid, HARDWARE, sample, verdict, True, stored, advised, snapshot)


def regression() -> TestResult:
    """The running example, advised, with the baseline's attribution and a snapshot."""
    return make(
        now=attribution(NOW, fragmentation=320 * MiB, context=512 * MiB),
        before=attribution(BEFORE, fragmentation=256 * MiB, context=512 * MiB),
        advised=advice(),
        snapshot=SNAPSHOT,
    )


def test_lever_names_cover_every_lever() -> None:
    assert set(LEVER_NAMES) == set(LEVERS)


# ---------------------------------------------------------------- largest consumer


@pytest.mark.parametrize(
    ("peak", "expected"),
    [
        (NOW, "activations 66%"),  # 5.25 of 8 GiB
        (BEFORE, "activations 59%"),  # 4 of 6.75 GiB
        (Breakdown(weights=3 * GiB, activations=GiB), "weights 75%"),
        (Breakdown(gradients=1), "gradients 100%"),
        (Breakdown(optimizer=2, activations=1), "optimizer 67%"),
        (Breakdown(weights=GiB, gradients=GiB), "weights 50%"),  # a tie goes to the first consumer
        (Breakdown(), "-"),  # nothing attributed
    ],
)
def test_largest_consumer(peak: Breakdown, expected: str) -> None:
    assert largest_consumer(attribution(peak)) == expected


def test_largest_consumer_without_attribution() -> None:
    assert largest_consumer(None) == "-"


def test_largest_consumer_is_the_last_cell() -> None:
    assert cells(make(now=attribution(NOW)))[-1] == "activations 66%"
    assert cells(make())[-1] == "-"


# ---------------------------------------------------------------- where


@pytest.mark.parametrize(
    ("phase", "stage", "module", "device", "expected"),
    [
        ("step2", "backward", "LogSoftmaxBackward0", "cuda:0", "step2, backward (LogSoftmaxBackward0) on cuda:0"),
        ("call", "forward", "", "cpu", "call, forward on cpu"),
        ("", "optimizer", "", "cuda:1", "optimizer on cuda:1"),
        ("step", "", "", "", "step"),
        ("", "", "model.layers.3.self_attn", "", "the call (model.layers.3.self_attn)"),
        ("", "", "", "", "the call"),
    ],
)
def test_where(phase: str, stage: str, module: str, device: str, expected: str) -> None:
    assert where(attribution(NOW, phase=phase, stage=stage, module=module, device=device)) == expected


# ---------------------------------------------------------------- attribution rows


def test_attribution_rows_beside_baseline() -> None:
    assert attribution_rows(regression()) == [
        ["weights", "2.00 GiB", "2.00 GiB", "+0 B"],
        ["gradients", "256.00 MiB", "256.00 MiB", "+0 B"],
        ["optimizer", "512.00 MiB", "512.00 MiB", "+0 B"],
        ["activations", "4.00 GiB", "5.25 GiB", "+1.25 GiB"],
        ["allocator cache (reserved - allocated)", "256.00 MiB", "320.00 MiB", "+64.00 MiB"],
        ["outside the allocator (context, workspaces)", "512.00 MiB", "512.00 MiB", "+0 B"],
    ]


@pytest.mark.parametrize("stored", [False, True], ids=["no-baseline", "baseline-without-attribution"])
def test_attribution_rows_without_baseline_attribution(stored: bool) -> None:
    r = make(now=attribution(NOW, context=300 * MiB), baseline=BASE if stored else None)
    assert attribution_rows(r) == [
        ["weights", "-", "2.00 GiB", "-"],
        ["gradients", "-", "256.00 MiB", "-"],
        ["optimizer", "-", "512.00 MiB", "-"],
        ["activations", "-", "5.25 GiB", "-"],
        ["outside the allocator (context, workspaces)", "-", "300.00 MiB", "-"],
    ]


@pytest.mark.parametrize(
    ("now", "before", "extra"),
    [
        ((0, 0), (0, 0), []),
        ((MiB, 0), None, [["allocator cache (reserved - allocated)", "-", "1.00 MiB", "-"]]),
        ((0, 0), None, []),
        # shown where either side has it, so a cache that vanished shows as a drop
        ((0, 0), (MiB, 0), [["allocator cache (reserved - allocated)", "1.00 MiB", "0 B", "-1.00 MiB"]]),
        ((0, 2 * MiB), (0, 0), [["outside the allocator (context, workspaces)", "0 B", "2.00 MiB", "+2.00 MiB"]]),
        (
            (3 * MiB, 2 * MiB),
            (MiB, 0),
            [
                ["allocator cache (reserved - allocated)", "1.00 MiB", "3.00 MiB", "+2.00 MiB"],
                ["outside the allocator (context, workspaces)", "0 B", "2.00 MiB", "+2.00 MiB"],
            ],
        ),
    ],
)
def test_attribution_rows_cache_and_outside_only_when_nonzero(
    now: tuple[int, int], before: tuple[int, int] | None, extra: list[list[str]]
) -> None:
    r = make(
        now=attribution(NOW, fragmentation=now[0], context=now[1]),
        before=attribution(NOW, fragmentation=before[0], context=before[1]) if before else None,
    )
    rows = attribution_rows(r)
    assert [row[0] for row in rows[:4]] == ["weights", "gradients", "optimizer", "activations"]
    assert rows[4:] == extra


def test_attribution_rows_without_attribution() -> None:
    assert attribution_rows(make(before=attribution(BEFORE))) == []


# ---------------------------------------------------------------- grown consumer


def test_grown_consumer() -> None:
    assert grown_consumer(regression()) == "activations +1.25 GiB (4.00 GiB -> 5.25 GiB)"


@pytest.mark.parametrize(
    ("now", "before", "expected"),
    [
        # the largest growth wins, not the largest consumer
        (
            Breakdown(weights=8 * GiB, gradients=GiB, optimizer=3 * GiB, activations=GiB),
            Breakdown(weights=7 * GiB, gradients=GiB, optimizer=GiB, activations=2 * GiB),
            "optimizer +2.00 GiB (1.00 GiB -> 3.00 GiB)",
        ),
        (Breakdown(gradients=MiB + 100), Breakdown(gradients=MiB), "gradients +100 B (1.00 MiB -> 1.00 MiB)"),
        (Breakdown(weights=GiB, activations=GiB), Breakdown(weights=GiB, activations=GiB), None),  # unchanged
        (Breakdown(weights=GiB), Breakdown(weights=2 * GiB, activations=MiB), None),  # everything shrank
    ],
)
def test_grown_consumer_picks_the_largest_growth(now: Breakdown, before: Breakdown, expected: str | None) -> None:
    assert grown_consumer(make(now=attribution(now), before=attribution(before))) == expected


@pytest.mark.parametrize(
    "r",
    [
        make(now=attribution(NOW)),  # baseline without an attribution
        make(now=attribution(NOW), baseline=None),  # no baseline at all
        make(before=attribution(BEFORE)),  # no attribution now
    ],
    ids=["baseline-without-attribution", "no-baseline", "no-attribution"],
)
def test_grown_consumer_needs_both_attributions(r: TestResult) -> None:
    assert grown_consumer(r) is None


# ---------------------------------------------------------------- levers and advice


@pytest.mark.parametrize(
    ("lever", "expected"),
    [
        (
            Lever("checkpointing", "gradient_checkpointing=True", 1181116006, "measured"),
            "gradient checkpointing: gradient_checkpointing=True; saves 1.10 GiB (measured)",
        ),
        (
            Lever("optimizer", "optim='adamw_bnb_8bit'", 0, "estimated"),
            "8-bit optimizer: optim='adamw_bnb_8bit'; saves nothing here (estimated)",
        ),
        (
            Lever("bf16", "bf16=True", -256 * MiB, "measured"),
            "bf16 mixed precision: bf16=True; costs 256.00 MiB more (measured)",
        ),
        (
            Lever("fix", "use_cache=False", 300, "estimated", basis="ignored: not in the text"),
            "fix a setting: use_cache=False; saves 300 B (estimated)",
        ),
        (Lever("unknown", "do it", MiB, "estimated"), "unknown: do it; saves 1.00 MiB (estimated)"),
    ],
)
def test_lever_text(lever: Lever, expected: str) -> None:
    assert lever_text(lever) == expected


@pytest.mark.parametrize(
    ("recommended", "needed", "expected"),
    [
        (["checkpointing"], NEEDED, "gradient checkpointing: frees 3.50 GiB of the 1.10 GiB needed (enough)"),
        (["checkpointing"], 7 * GiB // 2, "gradient checkpointing: frees 3.50 GiB of the 3.50 GiB needed (enough)"),
        (["batch"], NEEDED, "smaller batch + accumulation: frees 512.00 MiB of the 1.10 GiB needed (not enough)"),
        # several levers are named in the order of their cost to quality and their savings added
        (
            ["seq", "batch"],
            3 * GiB,
            "smaller batch + accumulation + shorter max_seq_length: frees 2.56 GiB of the 3.00 GiB needed (not enough)",
        ),
        ([], NEEDED, "no lever found that frees the 1.10 GiB needed"),
        (["lora"], NEEDED, "no lever found that frees the 1.10 GiB needed"),  # recommended but not among the levers
        (["checkpointing"], None, ""),  # nothing needed: nothing to recommend against
        ([], None, ""),
    ],
)
def test_recommendation(recommended: list[str], needed: int | None, expected: str) -> None:
    assert recommendation(advice(recommended=recommended, needed=needed)) == expected


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        (advice(), "checkpointing"),
        (advice(recommended=["seq", "checkpointing"]), "checkpointing"),  # the first of them in lever order
        (advice(recommended=["seq"]), "seq"),  # recommended beats cheaper levers
        (advice(recommended=[]), "batch"),  # else the cheapest in quality that saves memory
        (advice(recommended=[], levers=levers()[3:]), None),  # a lever that costs or saves nothing is not named
        (
            advice(recommended=[], levers=[Lever("bf16", "bf16=True", 0, "measured"), *levers()[2:3]]),
            "seq",
        ),
        (Advice(), None),
        (None, None),
    ],
)
def test_top_lever(given: Advice | None, expected: str | None) -> None:
    lever = top_lever(given)
    assert (lever.key if lever else None) == expected


# ---------------------------------------------------------------- failure message


def test_failure_message_regression_explained() -> None:
    assert terminal.failure_message(regression()) == (
        "gpumem: regression over baseline (allocated peak, cuda backend, hardware NVIDIA-H100-80GB-HBM3)\n"
        "  peak      8.00 GiB (8589934592 B)\n"
        "  baseline  6.75 GiB (7247757312 B) recorded 2025-11-20 with torch 2.6.0, transformers 4.57.6\n"
        "  delta     +1.25 GiB (+18.5%), tolerance 2% allows +138.24 MiB\n"
        "  phases    call 8.00 GiB\n"
        "  at        step, backward (model.layers.31.mlp) on cuda:0\n"
        "  grew      activations +1.25 GiB (4.00 GiB -> 5.25 GiB)\n"
        "  setting   gradient_checkpointing=True has no effect: use_cache=True turns it off in training\n"
        "  lever     gradient checkpointing: gradient_checkpointing=True, use_cache=False; saves 3.50 GiB (measured)\n"
        "  advice    gradient checkpointing: frees 3.50 GiB of the 1.10 GiB needed (enough)\n"
        "  snapshot  gpumem-snapshots/tests__test_train.py__test_lora_step.pickle"
        " (open it at https://pytorch.org/memory_viz)"
    )


def test_failure_message_attribution_without_advice() -> None:
    r = make(status="over_budget", baseline=None, budget=6 * GiB, now=attribution(NOW, phase="", module=""))
    assert terminal.failure_message(r).splitlines()[1:] == [
        "  peak      8.00 GiB (8589934592 B)",
        "  baseline  none for this hardware",
        "  budget    6.00 GiB, exceeded by 2.00 GiB",
        "  phases    call 8.00 GiB",
        "  at        backward on cuda:0",
    ]


def test_failure_message_advice_without_recommendation() -> None:
    # nothing needed and nothing recommended: the cheapest lever that saves memory is named, no advice line
    r = make(status="ok", now=attribution(NOW), advised=advice(findings=[], needed=None, recommended=[]))
    lines = terminal.failure_message(r).splitlines()
    assert [line for line in lines if line.startswith(("  setting", "  lever", "  advice", "  grew"))] == [
        "  lever     smaller batch + accumulation: per_device_train_batch_size 8 -> 4,"
        " gradient_accumulation_steps 1 -> 2; saves 512.00 MiB (estimated)"
    ]


# ---------------------------------------------------------------- terminal summary


def summary_results() -> list[TestResult]:
    return [
        make("t.py::ok", "ok", 3 * GiB, 3 * GiB, now=attribution(Breakdown(weights=2 * GiB, activations=GiB))),
        regression(),
        make(
            "t.py::big",
            "over_budget",
            7 * GiB,
            None,
            budget=6 * GiB,
            now=attribution(Breakdown(weights=6 * GiB, optimizer=GiB), phase="", stage="optimizer", module=""),
        ),
        make("t.py::plain", "regression", 2 * GiB, GiB, allowed=MiB),  # failed, but nothing to explain
    ]


def test_summary_lines_with_explanations() -> None:
    assert terminal.summary_lines(summary_results()) == [
        "test                                 metric         peak  baseline                delta    budget  verdict"
        "      largest consumer",
        "-----------------------------------  ---------  --------  --------  -------------------  --------  -----------"
        "  ----------------",
        "t.py::big                            allocated  7.00 GiB         -                    -  6.00 GiB  over budget"
        "  weights 86%",
        "tests/test_train.py::test_lora_step  allocated  8.00 GiB  6.75 GiB   +1.25 GiB (+18.5%)         -  regression"
        "   activations 66%",
        "t.py::plain                          allocated  2.00 GiB  1.00 GiB  +1.00 GiB (+100.0%)         -  regression"
        "   -",
        "t.py::ok                             allocated  3.00 GiB  3.00 GiB         +0 B (+0.0%)         -  ok"
        "           weights 67%",
        "t.py::big:",
        "  peak at optimizer on cuda:0",
        "  consumer     baseline       now  delta",
        "  -----------  --------  --------  -----",
        "  weights             -  6.00 GiB      -",
        "  gradients           -       0 B      -",
        "  optimizer           -  1.00 GiB      -",
        "  activations         -       0 B      -",
        "tests/test_train.py::test_lora_step:",
        "  peak at step, backward (model.layers.31.mlp) on cuda:0",
        "  consumer                                       baseline         now       delta",
        "  -------------------------------------------  ----------  ----------  ----------",
        "  weights                                        2.00 GiB    2.00 GiB        +0 B",
        "  gradients                                    256.00 MiB  256.00 MiB        +0 B",
        "  optimizer                                    512.00 MiB  512.00 MiB        +0 B",
        "  activations                                    4.00 GiB    5.25 GiB   +1.25 GiB",
        "  allocator cache (reserved - allocated)       256.00 MiB  320.00 MiB  +64.00 MiB",
        "  outside the allocator (context, workspaces)  512.00 MiB  512.00 MiB        +0 B",
        "  setting: gradient_checkpointing=True has no effect: use_cache=True turns it off in training",
        "  levers, in order of cost to quality:",
        "    smaller batch + accumulation: per_device_train_batch_size 8 -> 4, gradient_accumulation_steps 1 -> 2;"
        " saves 512.00 MiB (estimated) [activations halve with the batch]",
        "    gradient checkpointing: gradient_checkpointing=True, use_cache=False; saves 3.50 GiB (measured)"
        " [re-ran the step]  <- recommended",
        "    shorter max_seq_length: max_seq_length 4096 -> 2048; saves 2.06 GiB (estimated) [layer activations halve]",
        "    bf16 mixed precision: bf16=True; costs 256.00 MiB more (measured)"
        " [fp32 master weights kept beside bf16 ones]",
        "    8-bit optimizer: optim='adamw_bnb_8bit'; saves nothing here (estimated)",
        "  gradient checkpointing: frees 3.50 GiB of the 1.10 GiB needed (enough)",
        "sizes in binary units (1 GiB = 2^30 bytes)",
        "2 regressions, 1 over budget, 1 ok",
    ]


def test_summary_explains_advised_passing_tests() -> None:
    # --gpumem-explain=all: a passing test with advice is explained too, but one without advice is not
    advised = make("t.py::a", "ok", VALUE, VALUE, now=attribution(NOW), advised=advice(findings=[], needed=None))
    quiet = make("t.py::b", "ok", VALUE, VALUE, now=attribution(NOW))
    lines = terminal.summary_lines([advised, quiet])
    assert [line for line in lines if line.endswith(":")] == ["t.py::a:", "  levers, in order of cost to quality:"]
    assert not any(line.startswith("  setting") for line in lines)


# ---------------------------------------------------------------- Markdown


def details(text: str) -> list[str]:
    """The ``<details>`` blocks of a Markdown report, each as one string."""
    blocks = text.split("<details>")[1:]
    return ["<details>" + block[: block.index("</details>") + len("</details>")] for block in blocks]


def test_markdown_details_exact() -> None:
    text = markdown.render(summary_results(), ENV)
    assert details(text) == [
        "<details><summary><code>t.py::big</code>: peak at optimizer on cuda:0</summary>\n"
        "\n"
        "| consumer | baseline | now | delta |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| weights | - | 6.00 GiB | - |\n"
        "| gradients | - | 0 B | - |\n"
        "| optimizer | - | 1.00 GiB | - |\n"
        "| activations | - | 0 B | - |\n"
        "\n"
        "</details>",
        "<details><summary><code>tests/test_train.py::test_lora_step</code>: peak at step, backward "
        "(model.layers.31.mlp) on cuda:0</summary>\n"
        "\n"
        "| consumer | baseline | now | delta |\n"
        "| --- | ---: | ---: | ---: |\n"
        "| weights | 2.00 GiB | 2.00 GiB | +0 B |\n"
        "| gradients | 256.00 MiB | 256.00 MiB | +0 B |\n"
        "| optimizer | 512.00 MiB | 512.00 MiB | +0 B |\n"
        "| activations | 4.00 GiB | 5.25 GiB | +1.25 GiB |\n"
        "| allocator cache (reserved - allocated) | 256.00 MiB | 320.00 MiB | +64.00 MiB |\n"
        "| outside the allocator (context, workspaces) | 512.00 MiB | 512.00 MiB | +0 B |\n"
        "\n"
        "- setting: gradient_checkpointing=True has no effect: use_cache=True turns it off in training\n"
        "- smaller batch + accumulation: per_device_train_batch_size 8 -> 4, gradient_accumulation_steps 1 -> 2;"
        " saves 512.00 MiB (estimated) — activations halve with the batch\n"
        "- gradient checkpointing: gradient_checkpointing=True, use_cache=False; saves 3.50 GiB (measured)"
        " — re-ran the step **(recommended)**\n"
        "- shorter max_seq_length: max_seq_length 4096 -> 2048; saves 2.06 GiB (estimated)"
        " — layer activations halve\n"
        "- bf16 mixed precision: bf16=True; costs 256.00 MiB more (measured)"
        " — fp32 master weights kept beside bf16 ones\n"
        "- 8-bit optimizer: optim='adamw_bnb_8bit'; saves nothing here (estimated)\n"
        "- **gradient checkpointing: frees 3.50 GiB of the 1.10 GiB needed (enough)**\n"
        "\n"
        "</details>",
    ]


def test_markdown_details_follow_the_table_and_notes() -> None:
    lines = markdown.render(summary_results(), ENV).splitlines()
    table = [line for line in lines if line.startswith("| ") and line.count(" | ") == 7]
    assert table[0] == "| test | metric | peak | baseline | delta | budget | verdict | largest consumer |"
    assert table[2:] == [
        "| `t.py::big` | allocated | 7.00 GiB | - | - | 6.00 GiB | **over budget** | weights 86% |",
        "| `tests/test_train.py::test_lora_step` | allocated | 8.00 GiB | 6.75 GiB | +1.25 GiB (+18.5%) | - |"
        " **regression** | activations 66% |",
        "| `t.py::plain` | allocated | 2.00 GiB | 1.00 GiB | +1.00 GiB (+100.0%) | - | **regression** | - |",
        "| `t.py::ok` | allocated | 3.00 GiB | 3.00 GiB | +0 B (+0.0%) | - | ok | weights 67% |",
    ]
    opened = [i for i, line in enumerate(lines) if line.startswith("<details>")]
    assert len(opened) == 2
    assert lines[opened[0] - 1] == ""
    assert opened[0] > lines.index(table[-1])
    assert lines[-3:] == ["</details>", "", "sizes in binary units (1 GiB = 2^30 bytes)"]


def test_markdown_details_escape_pipes_in_findings() -> None:
    r = make(now=attribution(NOW), advised=Advice(findings=["target_modules='q|v' matches nothing"]))
    assert "- setting: target_modules='q\\|v' matches nothing" in markdown.render([r], ENV).splitlines()


def test_markdown_without_attribution_or_advice_has_no_details() -> None:
    assert "<details>" not in markdown.render([make(), make("t.py::ok", "ok", now=attribution(NOW))], ENV)


# ---------------------------------------------------------------- JSON


def round_trip(results: list[TestResult], tmp_path) -> list[TestResult]:
    path = tmp_path / "gpumem.json"
    path.write_text(json_report.dumps(json_report.build(results, ENV)), encoding="utf-8")
    environment, loaded = json_report.load(path)
    assert environment == ENV
    return loaded


def test_json_round_trip_keeps_attribution_advice_and_snapshot(tmp_path) -> None:
    original = regression()
    original.sample.attribution.stages = {
        "forward": Breakdown(weights=2 * GiB, activations=3 * GiB, layer_activations=2 * GiB),
        "backward": NOW,
        "optimizer": Breakdown(weights=2 * GiB, gradients=256 * MiB, optimizer=512 * MiB),
    }
    original.baseline.attribution.stages = {"backward": BEFORE}
    (loaded,) = round_trip([original], tmp_path)
    assert loaded.to_dict() == original.to_dict()
    assert loaded == original
    assert loaded.sample.attribution.stages["forward"].layer_activations == 2 * GiB
    assert loaded.baseline.attribution.fragmentation == 256 * MiB
    assert loaded.advice.levers[1] == Lever(
        "checkpointing",
        "gradient_checkpointing=True, use_cache=False",
        7 * GiB // 2,
        "measured",
        "re-ran the step",
        estimated=15 * GiB // 4,
    )
    assert loaded.advice.levers[0].estimated is None
    assert loaded.snapshot == SNAPSHOT


@pytest.mark.parametrize(
    "r",
    [
        make(),  # neither attribution, advice nor snapshot
        make(now=attribution(NOW)),  # attribution only, baseline without one
        make(baseline=None, advised=Advice()),  # empty advice
        make(advised=advice(needed=None, recommended=[]), snapshot=SNAPSHOT),
    ],
    ids=["plain", "attribution-only", "empty-advice", "advice-without-need"],
)
def test_json_round_trip_partial(r: TestResult, tmp_path) -> None:
    (loaded,) = round_trip([r], tmp_path)
    assert loaded.to_dict() == r.to_dict()


def test_json_round_trip_of_several_results_then_rendered(tmp_path) -> None:
    results = summary_results()
    loaded = round_trip(results, tmp_path)
    assert [r.to_dict() for r in loaded] == [r.to_dict() for r in sorted(results, key=lambda r: r.nodeid)]
    # what is read back explains itself as the original did
    assert terminal.summary_lines(loaded) == terminal.summary_lines(results)
    assert markdown.render(loaded, ENV) == markdown.render(results, ENV)


def test_json_reads_documents_written_before_advice(tmp_path) -> None:
    doc = json_report.build([make()], ENV)
    for test in doc["tests"]:
        del test["advice"], test["snapshot"], test["sample"]["attribution"], test["baseline"]["attribution"]
    path = tmp_path / "old.json"
    path.write_text(json_report.dumps(doc), encoding="utf-8")
    _, (loaded,) = json_report.load(path)
    assert loaded.advice is None
    assert loaded.snapshot == ""
    assert loaded.sample.attribution is None
    assert loaded.baseline.attribution is None
    assert loaded.to_dict() == make().to_dict()
