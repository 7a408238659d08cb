"""The history store and step detection: appends, formats, locking, change points, and the plugin's rows."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pytest_gpumem.ci import history
from pytest_gpumem.ci.history import COLUMNS, HistoryError, RunInfo, change_points
from pytest_gpumem.core.sample import Baseline, Sample, TestResult, Verdict
from pytest_gpumem.core.units import Tolerance

pd = pytest.importorskip("pandas")

MiB = 2**20
GiB = 2**30
SOFTWARE = {"torch": "2.13.0+cpu", "transformers": "5.23.0"}


def result(nodeid: str, allocated: int | None, reserved: int | None = None, status: str = "ok", baseline=None):
    phases = {}
    if allocated is not None:
        phases["call"] = {"allocated": {"cuda:0": allocated}}
        if reserved is not None:
            phases["call"]["reserved"] = {"cuda:0": reserved}
    stored = None
    if baseline is not None:
        stored = Baseline({"allocated": {"cuda:0": baseline}}, {}, {}, "", "cuda")
    verdict = Verdict(status, "allocated", allocated, baseline=baseline)
    return TestResult(nodeid, "H100", Sample("cuda", phases=phases), verdict, True, stored)


# -- change points: plain tables


STEP = Tolerance(percent=2.0, floor=MiB)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        pytest.param([100] * 6, [], id="flat"),
        pytest.param([100, 100, 100, 110, 110, 110], [3], id="one step up"),
        pytest.param([100, 100, 90, 90, 90], [2], id="one step down"),
        pytest.param([100, 100, 130, 100, 100, 100], [], id="a lone spike is not a step"),
        pytest.param([100, 100, 100, 100, 130], [], id="the last run alone is not yet a step"),
        pytest.param([100, 100, 130, 130], [2], id="sustained for two runs"),
        pytest.param([100, 101, 100, 101, 100], [], id="noise within tolerance"),
        pytest.param([100, 100, 120, 120, 140, 140, 140], [2, 4], id="two steps"),
        pytest.param([100, 100, 120, 100, 120, 120], [4], id="a blip before the real step"),
    ],
)
def test_change_points(values, expected):
    mib = [v * MiB for v in values]
    assert change_points(mib, STEP) == expected


def test_the_floor_keeps_small_tests_from_stepping_on_kilobytes():
    kib = [100 * 1024] * 3 + [120 * 1024] * 3  # +20%, but only 20 KiB
    assert change_points(kib, STEP) == []
    assert change_points(kib, Tolerance(percent=2.0)) == [3]


def test_sustain_sets_how_long_a_level_must_hold():
    values = [100 * MiB] * 3 + [150 * MiB] * 2
    assert change_points(values, STEP, sustain=2) == [3]
    assert change_points(values, STEP, sustain=3) == []
    assert change_points(values[:4], STEP, sustain=1) == [3]


def test_steps_name_the_first_commit_of_the_new_level_with_levels_before_and_after():
    values = [GiB, GiB, GiB + MiB // 2, GiB, GiB + 64 * MiB, GiB + 64 * MiB, GiB + 65 * MiB]
    points = [history.Point(f"2026-01-0{i + 1}T00:00:00+00:00", f"c{i}", "main", v) for i, v in enumerate(values)]
    series = history.Series("H100", "cuda", "t.py::a", "allocated", points)
    (step,) = history.steps(series)
    assert (step.commit, step.index, step.before, step.after) == ("c4", 4, GiB, GiB + 64 * MiB)
    assert step.delta == 64 * MiB


# -- rows


def test_rows_one_per_test_and_metric_with_verdict_on_the_judged_one():
    info = RunInfo("2026-01-01T00:00:00+00:00", "abc", "main")
    out = history.rows([result("t.py::a", 3 * MiB, 4 * MiB, "regression", baseline=2 * MiB)], SOFTWARE, info)
    assert [(r["metric"], r["value"], r["baseline"], r["status"]) for r in out] == [
        ("allocated", 3 * MiB, 2 * MiB, "regression"),
        ("reserved", 4 * MiB, None, ""),
    ]
    assert out[0]["commit"] == "abc" and out[0]["torch"] == "2.13.0+cpu" and out[0]["hardware"] == "H100"


def test_run_info_from_ci_variables_and_overrides():
    env = {"GITHUB_SHA": "deadbeef", "GITHUB_HEAD_REF": "", "GITHUB_REF_NAME": "main"}
    info = history.run_info(env=env)
    assert (info.commit, info.branch) == ("deadbeef", "main")
    env = {"GITHUB_SHA": "deadbeef", "GITHUB_HEAD_REF": "feature", "GPUMEM_COMMIT": "cafe"}
    assert history.run_info(env=env).commit == "cafe"
    assert history.run_info(env=env).branch == "feature"


def test_run_info_from_git_and_empty_without_it(tmp_path):
    assert history.run_info(tmp_path, env={}).commit == ""  # not a repository
    subprocess.run(["git", "init", "-q", "-b", "trunk"], cwd=tmp_path, check=True)
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "x"],
        cwd=tmp_path,
        check=True,
    )
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    info = history.run_info(tmp_path, env={})
    assert (info.commit, info.branch) == (head, "trunk")


# -- the file


@pytest.mark.parametrize("name", ["history.csv", "history.parquet"])
def test_append_and_load_round_trip(tmp_path, name):
    if name.endswith(".parquet"):
        pytest.importorskip("pyarrow")
    path = tmp_path / "sub" / name
    assert (
        history.append(path, [result("t.py::a", MiB)], SOFTWARE, RunInfo("2026-01-01T00:00:00+00:00", "0123", "main"))
        == 1
    )
    history.append(
        path,
        [result("t.py::a", 2 * MiB, 3 * MiB)],
        {**SOFTWARE, "peft": "0.21.2"},
        RunInfo("2026-01-02T00:00:00+00:00", "4567", "pr"),
    )
    frame = history.load(path)
    assert list(frame.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert frame["commit"].tolist() == ["0123", "4567", "4567"]  # a numeric-looking commit stays text
    assert frame["value"].tolist() == [MiB, 2 * MiB, 3 * MiB]
    assert str(frame["value"].dtype) == "Int64"
    assert frame["baseline"].isna().all()
    assert frame["peft"].tolist() == ["", "0.21.2", "0.21.2"]  # a new library adds a column


def test_load_orders_by_time(tmp_path):
    path = tmp_path / "h.csv"
    history.append(path, [result("t.py::a", 2 * MiB)], SOFTWARE, RunInfo("2026-02-01T00:00:00+00:00", "late", "main"))
    history.append(path, [result("t.py::a", MiB)], SOFTWARE, RunInfo("2026-01-01T00:00:00+00:00", "early", "main"))
    assert history.load(path)["commit"].tolist() == ["early", "late"]


def test_a_foreign_file_is_not_touched(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text("name,score\nalice,3\n")
    with pytest.raises(HistoryError, match=r"h\.csv: not a pytest-gpumem history table \(missing columns: time, "):
        history.append(path, [result("t.py::a", MiB)], SOFTWARE, RunInfo("2026-01-01T00:00:00+00:00", "", ""))
    assert path.read_text() == "name,score\nalice,3\n"


def test_a_corrupt_value_names_the_file(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text(",".join(COLUMNS) + "\n2026-01-01T00:00:00+00:00,c,b,H100,cuda,t.py::a,allocated,lots,,ok\n")
    with pytest.raises(HistoryError, match=r"h\.csv: malformed history table"):
        history.load(path)


def test_missing_file_and_missing_pyarrow_are_one_line_errors(tmp_path, monkeypatch):
    with pytest.raises(HistoryError, match=r"nope\.csv: no such history file"):
        history.load(tmp_path / "nope.csv")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    with pytest.raises(HistoryError, match=r"h\.parquet: a \.parquet history needs pyarrow"):
        history.append(tmp_path / "h.parquet", [result("t.py::a", MiB)], SOFTWARE)
    assert not (tmp_path / "h.parquet").exists()


def test_concurrent_appends_keep_every_row(tmp_path):
    """Four processes append five runs each to one file at once: all twenty survive."""
    path = tmp_path / "h.csv"
    script = textwrap.dedent(
        f"""
        import sys
        from pytest_gpumem.ci import history
        from pytest_gpumem.core.sample import Sample, TestResult, Verdict
        for run in range(5):
            sample = Sample("cpu", phases={{"call": {{"allocated": {{"cpu": run}}}}}})
            r = TestResult("t.py::p" + sys.argv[1], "cpu", sample, Verdict("new", "allocated", run), True)
            history.append({str(path)!r}, [r], {{}}, history.RunInfo("2026-01-01T00:00:00+00:00", "c", "b"))
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(i)]) for i in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    frame = history.load(path)
    assert len(frame) == 20
    assert sorted(frame.groupby("nodeid").size().tolist()) == [5, 5, 5, 5]


# -- through the plugin


def test_plugin_appends_one_run_per_session(pytester, monkeypatch):
    pytester.makepyfile(
        test_mem="""
        import pytest, torch

        @pytest.mark.gpumem
        def test_step():
            torch.empty(2**20, dtype=torch.uint8)
        """
    )
    monkeypatch.setenv("GPUMEM_COMMIT", "c1")
    monkeypatch.setenv("GPUMEM_BRANCH", "main")
    pytester.runpytest("--gpumem-history=hist/h.csv").assert_outcomes(passed=1)
    monkeypatch.setenv("GPUMEM_COMMIT", "c2")
    pytester.runpytest("--gpumem-history=hist/h.csv").assert_outcomes(passed=1)
    frame = history.load(pytester.path / "hist" / "h.csv")
    assert frame[
        ["commit", "branch", "hardware", "backend", "nodeid", "metric", "value", "status"]
    ].values.tolist() == [
        ["c1", "main", "cpu", "cpu", "test_mem.py::test_step", "allocated", MiB, "new"],
        ["c1", "main", "cpu", "cpu", "test_mem.py::test_step", "reserved", MiB, ""],
        ["c2", "main", "cpu", "cpu", "test_mem.py::test_step", "allocated", MiB, "new"],
        ["c2", "main", "cpu", "cpu", "test_mem.py::test_step", "reserved", MiB, ""],
    ]
    import torch

    assert set(frame["torch"]) == {torch.__version__}


def test_plugin_refuses_a_foreign_history_file_and_says_so(pytester):
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpumem\ndef test_x(): pass\n")
    (pytester.path / "h.csv").write_text("a,b\n1,2\n")
    result = pytester.runpytest("--gpumem-history=h.csv")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(
        ["gpumem: could not write the history (--gpumem-history): *h.csv: not a pytest-gpumem history table*"]
    )
    assert (pytester.path / "h.csv").read_text() == "a,b\n1,2\n"


def test_pandas_is_not_imported_by_the_plugin_unless_a_history_is_written():
    code = "import pytest_gpumem.plugin, sys; print('pandas' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_history_paths_are_relative_to_the_invocation_dir(pytester):
    pytester.makepyfile("import pytest\n\n@pytest.mark.gpumem\ndef test_x(): pass\n")
    sub = pytester.mkdir("sub")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(sub)
        pytester.runpytest(str(pytester.path), "--gpumem-history=h.csv").assert_outcomes(passed=1)
    assert Path(sub / "h.csv").exists()
