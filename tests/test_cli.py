"""The ``gpumem`` command on result files and histories written by real pytester runs."""

from __future__ import annotations

import contextlib
import fnmatch
import json
import subprocess
import sys

import pytest

from pytest_gpumem import cli
from pytest_gpumem.core.sample import Baseline, Sample, TestResult, Verdict
from pytest_gpumem.report import json_report, markdown
from pytest_gpumem.report.terminal import summary_lines

with contextlib.suppress(ImportError):  # imported before pytester snapshots sys.modules: see tests/conftest.py
    import matplotlib.figure  # noqa: F401
    import pandas  # noqa: F401

MiB = 2**20

SUITE = """
import pytest, torch

@pytest.mark.gpumem{marker}
def test_grows():
    torch.empty({grows}, dtype=torch.uint8)

@pytest.mark.gpumem
def test_steady():
    torch.empty(2 * 2**20, dtype=torch.uint8)

@pytest.mark.gpumem
def test_{only}():
    torch.empty(2**20, dtype=torch.uint8)
"""


def run(pytester: pytest.Pytester, name: str, grows: int, only: str, marker: str = "") -> str:
    """Run the suite (test_grows allocating ``grows`` bytes) and return the path of its JSON results."""
    pytester.makepyfile(test_mem=SUITE.format(grows=grows, only=only, marker=marker))
    pytester.runpytest(f"--gpumem-json={name}")
    return str(pytester.path / name)


@pytest.fixture
def pair(pytester):
    """a.json: test_grows at 1 MiB; b.json: at 1.05 MiB (+5%); test_gone only in A, test_added only in B."""
    return run(pytester, "a.json", MiB, "gone"), run(pytester, "b.json", int(1.05 * MiB), "added")


def test_compare_fails_on_a_regression_and_prints_the_plugins_table(pair, capsys):
    a, b = pair
    assert cli.main(["compare", a, b]) == 1
    out = capsys.readouterr().out.splitlines()
    _, head = json_report.load(b)
    judged = cli.compare_results(json_report.load(a)[1], {}, head, {})
    assert out[: len(summary_lines(judged))] == summary_lines(judged)  # the same table as the plugin's
    assert out[0].split() == ["test", "metric", "peak", "baseline", "delta", "budget", "verdict", "largest", "consumer"]
    rows = {line.split()[0]: line for line in out[2:5]}
    assert "+51.20 KiB (+5.0%)" in rows["test_mem.py::test_grows"] and "regression" in rows["test_mem.py::test_grows"]
    assert "ok" in rows["test_mem.py::test_steady"].split()
    assert "new" in rows["test_mem.py::test_added"].split()
    assert f"missing in {b}: 1 tests of {a} did not run: test_mem.py::test_gone" in out
    assert f"new in {b}: 1 tests not in {a}: test_mem.py::test_added" in out


def test_compare_tolerance_option_and_the_tests_own_tolerance(pytester, pair, capsys):
    a, b = pair
    assert cli.main(["compare", a, b, "--tolerance", "10%"]) == 0
    # without --tolerance, each test keeps the tolerance its marker gave it in B
    lenient = run(pytester, "lenient.json", int(1.05 * MiB), "added", marker='(tolerance="10%")')
    assert cli.main(["compare", a, lenient]) == 0
    assert cli.main(["compare", a, lenient, "--tolerance", "1%"]) == 1
    capsys.readouterr()


def test_compare_explains_only_what_it_judges_failed(pytester, capsys):
    """B's own run flagged test_grows (+100% over its baseline) and recorded the advisor's explanation;
    judged ok at 200%, it is not explained again, unless --explain all."""
    pytester.makepyfile(test_mem=SUITE.format(grows=MiB, only="gone", marker=""))
    pytester.runpytest("--gpumem-update-baselines", "--gpumem-json=a.json").assert_outcomes(passed=3)
    pytester.makepyfile(test_mem=SUITE.format(grows=2 * MiB, only="gone", marker=""))
    pytester.runpytest("--gpumem-json=b.json").assert_outcomes(passed=2, failed=1)
    a, b = str(pytester.path / "a.json"), str(pytester.path / "b.json")
    recorded = {r.nodeid: r.advice for r in json_report.load(b)[1]}
    assert recorded["test_mem.py::test_grows"] is not None  # what B's run explained
    assert cli.main(["compare", a, b]) == 1
    assert "test_mem.py::test_grows:" in capsys.readouterr().out.splitlines()  # flagged here too: explained
    assert cli.main(["compare", a, b, "--tolerance", "200%", "--json", "judged.json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "test_mem.py::test_grows:" not in out and not any(line.startswith("  ") for line in out)
    assert all(test["advice"] is None for test in json.loads((pytester.path / "judged.json").read_text())["tests"])
    assert cli.main(["compare", a, b, "--tolerance", "200%", "--explain", "all"]) == 0
    assert "test_mem.py::test_grows:" in capsys.readouterr().out.splitlines()


def test_compare_writes_json_and_markdown(tmp_path, pair, capsys):
    a, b = pair
    assert cli.main(["compare", a, b, "--json", str(tmp_path / "c.json"), "--markdown", str(tmp_path / "c.md")]) == 1
    _, results = json_report.load(tmp_path / "c.json")
    by_id = {r.nodeid: r for r in results}
    assert by_id["test_mem.py::test_grows"].verdict.status == "regression"
    assert by_id["test_mem.py::test_grows"].verdict.baseline == MiB
    assert by_id["test_mem.py::test_grows"].baseline.recorded == a  # the baseline says where it came from
    text = (tmp_path / "c.md").read_text()
    assert text.startswith("### gpumem: 1 regression, 1 new, 1 ok\n")
    assert "| `test_mem.py::test_grows` | allocated | 1.05 MiB | 1.00 MiB | +51.20 KiB (+5.0%) |" in text
    capsys.readouterr()


def test_compare_never_compares_other_hardware(tmp_path, pair, capsys):
    a, b = pair
    doc = json.loads(open(a).read())
    for test in doc["tests"]:
        test["hardware"] = "NVIDIA-H100-80GB-HBM3"
    (tmp_path / "gpu.json").write_text(json.dumps(doc))
    assert cli.main(["compare", str(tmp_path / "gpu.json"), b]) == 0
    out = capsys.readouterr().out
    assert "2 new tests without baselines for hardware cpu; baselines exist for: NVIDIA-H100-80GB-HBM3" in out


def test_a_dependency_bump_leads_the_comment_with_what_it_cost_and_still_fails(tmp_path, pair, capsys):
    """A only bumped transformers and torch (here: A's environment says older versions): the comment
    leads with what changed and the cost per test, and the regression fails as any change would."""
    a, b = pair
    doc = json.loads(open(a).read())
    doc["environment"]["software"].update(transformers="5.17.0", torch="2.12.0")
    (tmp_path / "old.json").write_text(json.dumps(doc))
    new_software = json.loads(open(b).read())["environment"]["software"]
    status = cli.main(["compare", str(tmp_path / "old.json"), b, "--markdown", str(tmp_path / "pr.md")])
    assert status == 1
    lines = (tmp_path / "pr.md").read_text().splitlines()
    changes = f"torch 2.12.0 -> {new_software['torch']}; transformers 5.17.0 -> {new_software['transformers']}"
    assert lines[0] == "### gpumem: 1 regression, 1 new, 1 ok"
    assert lines[2] == f"**Dependencies changed** since the baselines: {changes}"
    assert lines[4:8] == [
        "| test | metric | cost | verdict |",
        "| --- | --- | ---: | --- |",
        "| `test_mem.py::test_grows` | allocated | +51.20 KiB (+5.0%) | **regression** |",
        "| `test_mem.py::test_steady` | allocated | +0 B (+0.0%) | ok |",
    ]
    out = capsys.readouterr().out
    assert f"software changed since baselines: {changes} (2 tests)" in out


def test_markdown_dependency_lead_groups_by_change_and_is_absent_without_changes():
    def result(nodeid, value, base, changes, status="ok"):
        sample = Sample("cuda", phases={"call": {"allocated": {"cuda:0": value}}})
        verdict = Verdict(status, "allocated", value, baseline=base, allowed=base // 50, software_changes=changes)
        stored = Baseline({"allocated": {"cuda:0": base}}, {}, {}, "", "cuda")
        return TestResult(nodeid, "H100", sample, verdict, True, stored)

    bump = ["transformers 5.17.0 -> 5.23.0"]
    results = [
        result("t.py::a", 1100 * MiB, 1000 * MiB, bump, "regression"),
        result("t.py::b", 500 * MiB, 500 * MiB, bump),
        result("t.py::c", 100 * MiB, 100 * MiB, ["peft 0.20 -> 0.21"]),
        result("t.py::d", 100 * MiB, 100 * MiB, []),
    ]
    text = markdown.render(results, {"software": {}}, warn_only=True)
    lines = text.splitlines()
    assert lines[2] == "**Dependencies changed** since the baselines (2 tests): transformers 5.17.0 -> 5.23.0"
    assert lines[6] == "| `t.py::a` | allocated | +100.00 MiB (+10.0%) | **regression (warn)** |"
    assert lines[9] == "**Dependencies changed** since the baselines (1 test): peft 0.20 -> 0.21"
    assert "t.py::d" not in "\n".join(lines[2:14])
    assert "Dependencies changed" not in markdown.render(results[3:], {"software": {}})


# -- errors and entry points


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tolerance", "2 parsecs"], "gpumem compare: error: --tolerance: '2 parsecs' is not a tolerance"),
        (["--json", "/proc/nope/x.json"], "gpumem compare: error: /proc/nope"),
    ],
)
def test_compare_bad_input_is_one_line_and_exit_2(pair, capsys, args, message):
    a, b = pair
    assert cli.main(["compare", a, b, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tolerance", "-5%"], "--tolerance: '-5%' is not a tolerance: it cannot be negative; write e.g. '2%'*"),
        (["--tolerance=-5%"], "--tolerance: '-5%' is not a tolerance: it cannot be negative*"),
        (["--tolerance", "-1 MiB, 2%"], "--tolerance: '-1 MiB, 2%' is not a tolerance: it cannot be negative*"),
        (
            ["--tolerance", "--json", "x.json"],
            "argument --tolerance: expected one argument (see gpumem compare --help)",
        ),
        (["--explain", "some"], "argument --explain: invalid choice: 'some' *(see gpumem compare --help)"),
        (["--frobnicate"], "unrecognized arguments: --frobnicate (see gpumem --help)"),
    ],
)
def test_compare_values_that_look_like_options_reach_their_own_one_line_error(pair, capsys, args, message):
    a, b = pair
    assert cli.main(["compare", a, b, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and fnmatch.fnmatch(err.strip().split(": error: ", 1)[1], message), err


def test_usage_errors_are_one_line_and_exit_2(capsys):
    assert cli.main(["compare", "a.json"]) == 2
    assert capsys.readouterr().err == (
        "gpumem compare: error: the following arguments are required: B.json (see gpumem compare --help)\n"
    )
    assert cli.main([]) == 2
    assert capsys.readouterr().err == (
        "gpumem: error: the following arguments are required: COMMAND (see gpumem --help)\n"
    )
    assert cli.main(["compare", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: gpumem compare")


def test_compare_a_file_that_is_not_results(tmp_path, pair, capsys):
    a, _ = pair
    (tmp_path / "x.json").write_text("[1, 2]")
    assert cli.main(["compare", a, str(tmp_path / "x.json")]) == 2
    assert capsys.readouterr().err == (
        f"gpumem compare: error: {tmp_path / 'x.json'}: "
        "expected a pytest-gpumem/results/v1 document, found schema None\n"
    )


def test_python_dash_m_and_the_exit_status(pair):
    a, b = pair
    done = subprocess.run([sys.executable, "-m", "pytest_gpumem", "compare", a, b], capture_output=True, text=True)
    assert done.returncode == 1 and "regression" in done.stdout
    done = subprocess.run([sys.executable, "-m", "pytest_gpumem", "frobnicate"], capture_output=True, text=True)
    assert done.returncode == 2 and "invalid choice: 'frobnicate'" in done.stderr


def test_a_subcommand_is_one_registered_function(capsys):
    @cli.command("hello", "say hello", cli.arg("name"))
    def hello(args):
        print(f"hello {args.name}")
        return 0

    try:
        assert cli.main(["hello", "world"]) == 0
        assert capsys.readouterr().out == "hello world\n"
    finally:
        del cli.COMMANDS["hello"]
    assert list(cli.COMMANDS) == ["compare", "merge", "report", "estimate"]


# -- report --history


STEPPING = """
import pytest, torch

@pytest.mark.gpumem
def test_train():
    torch.empty({mib} * 2**20, dtype=torch.uint8)

@pytest.mark.gpumem
def test_eval():
    torch.empty(2**20 + {jitter}, dtype=torch.uint8)
"""


@pytest.fixture
def stepped_history(pytester, monkeypatch):
    """Six runs on commits c0..c5: test_train steps from 4 to 8 MiB at c3 (with a one-run spike at c1),
    test_eval wobbles by a few KiB."""
    pytest.importorskip("pandas")
    monkeypatch.setenv("GPUMEM_BRANCH", "main")
    for commit, (mib, jitter) in enumerate([(4, 0), (6, 4096), (4, 0), (8, 2048), (8, 0), (8, 1024)]):
        pytester.makepyfile(test_mem=STEPPING.format(mib=mib, jitter=jitter))
        monkeypatch.setenv("GPUMEM_COMMIT", f"c{commit}")
        pytester.runpytest("--gpumem-history=history.csv").assert_outcomes(passed=2)
    return pytester.path / "history.csv"


def test_report_trends_steps_and_plots(stepped_history, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert cli.main(["report", "--history", str(stepped_history), "--out", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["test", "metric", "hardware", "runs", "first", "last", "change", "min", "max"]
    rows = [line.split() for line in out[2:6]]
    assert rows[0][:4] == ["test_mem.py::test_eval", "allocated", "cpu", "6"]
    assert rows[2][:4] == ["test_mem.py::test_train", "allocated", "cpu", "6"]
    assert " ".join(rows[2][4:]) == "4.00 MiB 8.00 MiB +4.00 MiB (+100.0%) 4.00 MiB 8.00 MiB"
    assert "steps (2): the first commit of each new level" in out
    steps = [line.strip() for line in out if line.startswith("  test_mem.py")]
    assert len(steps) == 2 and all(" up +4.00 MiB (+100.0%) at c3 (" in s for s in steps)
    assert steps[0].startswith("test_mem.py::test_train (allocated, cpu): up")
    assert steps[0].endswith("4.00 MiB -> 8.00 MiB")

    png = (tmp_path / "plots" / "history.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    page = (tmp_path / "plots" / "history.html").read_text()
    assert page.count("<svg") == 1 and "c3 +4.00 MiB" in page  # the step is marked on the plot
    assert "<td>test_mem.py::test_train</td>" in page
    assert "src=" not in page and "<script" not in page and "<link" not in page  # nothing loaded from elsewhere


def test_report_branch_filter_tolerance_and_no_plot(stepped_history, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["report", "--history", str(stepped_history), "--branch", "main", "--no-plot"]) == 0
    assert "steps (2): the first commit of each new level" in capsys.readouterr().out
    assert cli.main(["report", "--history", str(stepped_history), "--branch", "other", "--no-plot"]) == 2
    assert capsys.readouterr().err == (
        f"gpumem report: error: --branch: no runs of branch 'other' in {stepped_history} (its branches: 'main')\n"
    )
    assert cli.main(["report", "--history", str(stepped_history), "--tolerance", "200%", "--no-plot"]) == 0
    assert "steps: none (no sustained change beyond the tolerance)" in capsys.readouterr().out
    assert not list(tmp_path.iterdir())


def test_report_errors(tmp_path, capsys):
    pytest.importorskip("pandas")
    (tmp_path / "h.csv").write_text("x,y\n1,2\n")
    assert cli.main(["report", "--history", str(tmp_path / "h.csv")]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"gpumem report: error: {tmp_path / 'h.csv'}: not a pytest-gpumem history table (missing columns: "
        "time, commit, branch, hardware, backend, nodeid, metric, value, baseline, status)\n"
    )
    assert cli.main(["report", "--history", str(tmp_path / "h.csv"), "--sustain", "0"]) == 2
    assert "--sustain: 0 is not a number of runs" in capsys.readouterr().err


FORMATS = "a history is a CSV table, or Parquet where the name ends in .parquet, as --gpumem-history writes it"


def test_report_on_a_results_file_names_it_and_the_formats(pair, capsys):
    pytest.importorskip("pandas")
    a, _ = pair
    assert cli.main(["report", "--history", a, "--no-plot"]) == 2
    assert capsys.readouterr().err == (
        f"gpumem report: error: {a}: holds JSON (a --gpumem-json results file?), not a history: {FORMATS}\n"
    )


def test_report_on_a_table_pandas_cannot_read_is_one_line(tmp_path, capsys):
    pytest.importorskip("pandas")
    (tmp_path / "h.csv").write_text('time,commit\n"unterminated\n')  # pandas: "Error tokenizing data. ...\n"
    assert cli.main(["report", "--history", str(tmp_path / "h.csv"), "--no-plot"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"gpumem report: error: {tmp_path / 'h.csv'}: not a readable")
    assert err.endswith(f"; {FORMATS}\n")


# -- estimate: input checked before anything is estimated


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--compute-dtype", "int3"],
            "--compute-dtype: unknown dtype 'int3'; choose one of bfloat16, float16, float32",
        ),
        (
            ["--lora-targets", "foo_proj"],
            "--lora-targets: 'foo_proj' names no layer LoRA can adapt in llama tiny; its layers: down_proj, "
            "embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj",
        ),
        (["--lora-targets", "q_proj,self_attn"], "--lora-targets: 'self_attn' names no layer LoRA can adapt in*"),
        (["--lora-targets", "q_proj,"], "--lora-targets: '' names no layer LoRA can adapt in llama tiny*"),
        (["--lora-targets", "-q_proj"], "--lora-targets: '-q_proj' names no layer*"),
    ],
)
def test_estimate_bad_input_is_exit_2_naming_the_option(capsys, args, message):
    assert cli.main(["estimate", "--size", "tiny", "--seq", "64", "--no-levers", *args]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert fnmatch.fnmatch(captured.err, f"gpumem estimate: error: {message}\n"), captured.err


def test_estimate_lora_targets_match_as_peft_matches_them(capsys):
    args = ["estimate", "--size", "tiny", "--seq", "64", "--no-levers", "--json"]
    assert cli.main([*args, "--lora-targets", "q_proj, self_attn.v_proj,model.layers.0.mlp.up_proj"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["method"] == "fake" and data["recipe"]["lora_targets"] == [
        "q_proj",
        "self_attn.v_proj",
        "model.layers.0.mlp.up_proj",
    ]
