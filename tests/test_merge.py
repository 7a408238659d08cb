"""``gpumem merge``: sharded runs merged equal one unsharded run, byte for byte; conflicts are errors."""

from __future__ import annotations

import contextlib
import json

import pytest

from pytest_gpumem import cli
from pytest_gpumem.ci.merge import MergeError, merge, merge_environments
from pytest_gpumem.core.judge import judge
from pytest_gpumem.core.sample import Baseline, Sample, Spec, TestResult, Verdict
from pytest_gpumem.report import json_report, markdown
from pytest_gpumem.report.terminal import summary_lines

with contextlib.suppress(ImportError):  # imported before pytester snapshots sys.modules: see tests/conftest.py
    import pandas  # noqa: F401

MiB = 2**20

CONFTEST = """
import pytest, torch

@pytest.fixture
def weights():
    return torch.empty(2**20, dtype=torch.uint8)  # setup leftovers count
"""

TRAIN = """
import pytest, torch

@pytest.mark.gpumem(budget="{budget}")
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_step(weights, batch, gpumem):
    with gpumem.phase("forward"):
        act = torch.empty(batch * {per_sample}, dtype=torch.uint8)
    with gpumem.phase("backward"):
        grad = torch.empty(batch * 2**18, dtype=torch.uint8)
    del act, grad

@pytest.mark.gpumem(tolerance="5%")
def test_optimizer_state():
    state = [torch.empty(2**19, dtype=torch.uint8) for _ in range({states})]
"""

LOAD = """
import pytest, torch

@pytest.mark.gpumem
def test_load(weights):
    copy = weights.clone()

def test_unmeasured():
    torch.empty(10 * 2**20)
{extra}
"""

EXTRA = """
@pytest.mark.gpumem
def test_new_since_the_baselines():
    torch.empty(3 * 2**20, dtype=torch.uint8)
"""


def write(pytester: pytest.Pytester, per_sample: int, states: int, budget: str = "16 MiB", extra: str = "") -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_train=TRAIN.format(per_sample=per_sample, states=states, budget=budget),
        test_load=LOAD.format(extra=extra),
    )


def gpumem_section(result: pytest.RunResult) -> list[str]:
    lines = result.stdout.lines
    start = next(i for i, line in enumerate(lines) if " gpumem " in line and line.startswith("="))
    end = next(i for i in range(start + 1, len(lines)) if lines[i].startswith("="))
    return lines[start + 1 : end]


def test_two_shards_merge_to_exactly_the_unsharded_run(pytester, capsys):
    """Record baselines, change the suite (a regression, an improvement, an over-budget test, a new
    test), then run it whole and as two shards: the merged JSON and Markdown equal the whole run's,
    byte for byte, and the printed table equals the plugin's terminal section. Nothing is ignored:
    every value in the document is deterministic on the cpu backend."""
    write(pytester, per_sample=2**20, states=4)
    pytester.runpytest("--gpumem-update-baselines").assert_outcomes(passed=6)
    write(pytester, per_sample=5 * 2**19, states=2, budget="4 MiB", extra=EXTRA)

    whole = pytester.runpytest("--gpumem-json=whole.json", "--gpumem-markdown=whole.md")
    whole.assert_outcomes(passed=4, failed=3)
    first = pytester.runpytest("test_train.py", "--gpumem-json=shard1.json")
    second = pytester.runpytest("test_load.py", "--gpumem-json=shard2.json")
    first.assert_outcomes(passed=1, failed=3)
    second.assert_outcomes(passed=3)

    capsys.readouterr()
    path = pytester.path
    status = cli.main(
        [
            "merge",
            str(path / "shard1.json"),
            str(path / "shard2.json"),
            "-o",
            str(path / "merged.json"),
            "--markdown",
            str(path / "merged.md"),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out.splitlines()

    whole_doc = json.loads((path / "whole.json").read_text())
    statuses = sorted(t["status"] for t in whole_doc["tests"])
    assert statuses == ["improved", "new", "ok", "over_budget", "over_budget", "regression"]
    assert (path / "merged.json").read_text() == (path / "whole.json").read_text()
    assert (path / "merged.md").read_text() == (path / "whole.md").read_text()
    assert printed[: printed.index(f"wrote {path / 'merged.json'}")] == gpumem_section(whole)


def test_the_same_shard_twice_is_kept_once_but_different_results_conflict(pytester, capsys):
    write(pytester, per_sample=2**20, states=1)
    pytester.runpytest("test_load.py", "--gpumem-json=a.json")
    pytester.runpytest("test_load.py", "--gpumem-json=b.json")
    a, b = str(pytester.path / "a.json"), str(pytester.path / "b.json")
    assert cli.main(["merge", a, b, "-o", str(pytester.path / "m.json")]) == 0
    assert (pytester.path / "m.json").read_text() == (pytester.path / "a.json").read_text()

    pytester.makepyfile(test_load=LOAD.format(extra="").replace("weights.clone()", "weights.clone().clone()"))
    pytester.runpytest("test_load.py", "--gpumem-json=b.json")
    capsys.readouterr()
    assert cli.main(["merge", a, b]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"gpumem merge: error: test_load.py::test_load is in {a} and {b} with different results; "
        "merge the shards of one run, each test measured once\n"
    )


def result(nodeid: str, value: int) -> TestResult:
    return TestResult(
        nodeid,
        "cpu",
        Sample("cpu", phases={"call": {"allocated": {"cpu": value}}}),
        Verdict("new", "allocated", value),
        True,
    )


def test_environments_merge_lists_as_sets_and_refuse_to_mix_software():
    env_a = {"backends": ["cpu"], "hardware": ["cpu"], "software": {"torch": "2.13.0"}}
    env_b = {"backends": [], "hardware": ["H100"], "software": {"torch": "2.13.0", "peft": "0.21"}}
    merged, results = merge([("a.json", env_a, [result("t::b", 2)]), ("b.json", env_b, [result("t::a", 1)])])
    assert merged == {"backends": ["cpu"], "hardware": ["H100", "cpu"], "software": {"torch": "2.13.0", "peft": "0.21"}}
    assert [r.nodeid for r in results] == ["t::a", "t::b"]
    with pytest.raises(MergeError) as info:
        merge_environments(env_a, {"software": {"torch": "2.12.0"}}, "a.json, c.json", "environment")
    assert str(info.value) == (
        "environment.software.torch differs between the files (a.json, c.json): '2.13.0' vs '2.12.0'; "
        "the shards of one run share one environment"
    )


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    foreign = tmp_path / "foreign.json"
    foreign.write_text('{"schema": "something/else"}')
    assert cli.main(["merge", str(bad)]) == 2
    assert capsys.readouterr().err.startswith(f"gpumem merge: error: {bad}: not valid JSON")
    assert cli.main(["merge", str(foreign)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"gpumem merge: error: {foreign}: expected a pytest-gpumem/results/v1 document, found schema 'something/else'\n"
    )
    assert cli.main(["merge", str(tmp_path / "missing.json")]) == 2
    assert (
        capsys.readouterr().err
        == f"gpumem merge: error: {tmp_path / 'missing.json'}: cannot be read (No such file or directory)\n"
    )


def test_merge_can_export_and_append_to_the_history(pytester, capsys):
    pytest.importorskip("pandas")
    write(pytester, per_sample=2**20, states=1)
    pytester.runpytest("test_train.py", "--gpumem-json=s1.json")
    pytester.runpytest("test_load.py", "--gpumem-json=s2.json")
    path = pytester.path
    status = cli.main(
        [
            "merge",
            str(path / "s1.json"),
            str(path / "s2.json"),
            "--export",
            f"bmf={path / 'bmf.json'}",
            "--export",
            f"gab={path / 'gab.json'}",
            "--history",
            str(path / "h.csv"),
        ]
    )
    assert status == 0
    bmf = json.loads((path / "bmf.json").read_text())
    assert sorted(bmf) == [
        "test_load.py::test_load",
        "test_train.py::test_optimizer_state",
        "test_train.py::test_step[1]",
        "test_train.py::test_step[2]",
        "test_train.py::test_step[4]",
    ]
    assert bmf["test_load.py::test_load"]["gpumem-allocated"] == {"value": 2 * MiB}
    assert len(json.loads((path / "gab.json").read_text())) == 10
    assert "history: " in capsys.readouterr().out
    from pytest_gpumem.ci import history

    assert len(history.load(path / "h.csv")) == 10


def test_merged_document_reads_back():
    env = {"backends": ["cpu"], "hardware": ["cpu"], "software": {}}
    merged_env, results = merge([("a", env, [result("t::a", 1)])])
    doc = json_report.build(results, merged_env)
    assert doc["summary"]["new"] == 1


def judged(nodeid: str, now: dict[str, int], base: dict[str, int] | None) -> TestResult:
    """A result judged from given per-device numbers (devices and per-rank keys), as a multi-GPU run has them."""
    sample = Sample("cuda", phases={"call": {"allocated": now, "reserved": {d: 2 * n for d, n in now.items()}}})
    stored = Baseline({"allocated": base}, {}, {"torch": "2.13.0"}, "2025-11-20", "cuda") if base else None
    verdict = judge(sample, Spec(budget_per_device=(("cuda:1", 40 * MiB),)), stored, {"torch": "2.13.0"})
    return TestResult(nodeid, "H100", sample, verdict, True, stored)


def test_shards_with_per_device_results_merge_to_exactly_the_whole_run(tmp_path, capsys):
    """Results measured on several devices (and per rank) merge and render as one run's: the JSON, the
    Markdown and the printed table equal those written from all results at once, byte for byte."""
    results = [
        judged(
            "t.py::ddp",
            {"rank0:cuda:0": 30 * MiB, "rank1:cuda:0": 36 * MiB},
            {"rank0:cuda:0": 30 * MiB, "rank1:cuda:0": 30 * MiB},
        ),
        judged("t.py::pipeline", {"cuda:0": 30 * MiB, "cuda:1": 50 * MiB}, {"cuda:0": 30 * MiB, "cuda:1": 50 * MiB}),
        judged("t.py::sharded", {"cuda:0": 20 * MiB, "cuda:1": 20 * MiB}, {"cuda:0": 20 * MiB}),
        judged("t.py::single", {"cuda:0": 10 * MiB}, None),
    ]
    assert [r.verdict.status for r in results] == ["regression", "over_budget", "regression", "new"]
    assert [r.verdict.device for r in results] == ["rank1:cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    env = {"backends": ["cuda"], "hardware": ["H100"], "software": {"torch": "2.13.0"}}
    shards = {"s1.json": results[2:], "s2.json": results[:2]}
    for name, part in shards.items():
        (tmp_path / name).write_text(json_report.dumps(json_report.build(part, env)))

    merged_json, merged_md = tmp_path / "merged.json", tmp_path / "merged.md"
    capsys.readouterr()
    args = ["merge", *(str(tmp_path / name) for name in shards), "-o", str(merged_json), "--markdown", str(merged_md)]
    assert cli.main(args) == 0
    printed = capsys.readouterr().out.splitlines()

    assert merged_json.read_text() == json_report.dumps(json_report.build(results, env))
    assert merged_md.read_text() == markdown.render(results, env)
    assert printed[: printed.index(f"wrote {merged_json}")] == summary_lines(results)
    assert "over budget on cuda:1" in printed[2] and "regression on rank1:cuda:0" in printed[4]
    doc = json.loads(merged_json.read_text())
    assert [t["verdict"]["device"] for t in doc["tests"]] == ["rank1:cuda:0", "cuda:1", "cuda:1", "cuda:0"]
    assert [len(t["verdict"].get("devices", [])) for t in doc["tests"]] == [2, 2, 2, 0]

    # the same test in two shards with different per-device numbers is a conflict
    other = judged("t.py::ddp", {"rank0:cuda:0": 30 * MiB, "rank1:cuda:0": 37 * MiB}, {"rank0:cuda:0": 30 * MiB})
    with pytest.raises(MergeError) as info:
        merge([("s1.json", env, results[:1]), ("s3.json", env, [other])])
    assert str(info.value).startswith("t.py::ddp is in s1.json and s3.json with different results")
