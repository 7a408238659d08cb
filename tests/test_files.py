"""Files the plugin writes: whole at every moment, with the user's permissions, checked before the first
test, never over a foreign or corrupt file, and the same whatever the scheduling."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_gpumem.core import atomic, store
from pytest_gpumem.core.sample import Baseline, Sample, TestResult, Verdict

with contextlib.suppress(ImportError):  # imported before pytester snapshots sys.modules: see tests/conftest.py
    import matplotlib.figure  # noqa: F401
    import pandas  # noqa: F401
    import pyarrow  # noqa: F401

MiB = 2**20
SUITE = """
import pytest, torch

@pytest.mark.gpumem
def test_step():
    x = torch.empty({mib} * 2**20, dtype=torch.uint8)
"""


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


# -- permissions: those of open(path, "w"), or the replaced file's own


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027])
def test_a_new_file_gets_the_mode_open_would_give_it(tmp_path, mask):
    with umask(mask):
        atomic.write_atomic(tmp_path / "new.json", "{}\n")
        with open(tmp_path / "plain.json", "w") as handle:
            handle.write("{}\n")
    assert mode(tmp_path / "new.json") == mode(tmp_path / "plain.json") == 0o666 & ~mask


def test_a_replaced_file_keeps_its_mode(tmp_path):
    path = tmp_path / "cpu.json"
    path.write_text("old\n")
    path.chmod(0o640)
    with umask(0o022):
        atomic.write_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert mode(path) == 0o640


def test_every_file_the_plugin_writes_follows_the_umask(pytester):
    pytester.makepyfile(test_mem=SUITE.format(mib=1))
    with umask(0o027):
        result = pytester.runpytest(
            "--gpumem-update-baselines",
            "--gpumem-json=out/r.json",
            "--gpumem-markdown=out/r.md",
            "--gpumem-export=bmf=out/bmf.json,gab=out/gab.json",
            "--gpumem-history=out/h.csv",
        )
    result.assert_outcomes(passed=1)
    written = [pytester.path / "baselines" / "cpu.json"]
    written += [pytester.path / "out" / name for name in ("r.json", "r.md", "bmf.json", "gab.json", "h.csv")]
    assert {str(p.relative_to(pytester.path)): oct(mode(p)) for p in written} == {
        str(p.relative_to(pytester.path)): oct(0o640) for p in written
    }


def test_the_history_report_follows_the_umask(tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    from pytest_gpumem import cli
    from pytest_gpumem.ci import history

    table = tmp_path / "h.csv"
    for commit, value in enumerate([MiB, MiB, 2 * MiB, 2 * MiB]):
        sample = Sample("cpu", phases={"call": {"allocated": {"cpu": value}}})
        run = [TestResult("t.py::a", "cpu", sample, Verdict("ok", "allocated", value), True)]
        info = history.RunInfo(f"2026-01-0{commit + 1}T00:00:00+00:00", f"c{commit}", "main")
        history.append(table, run, {}, info)
    with umask(0o022):
        assert cli.main(["report", "--history", str(table), "--out", str(tmp_path / "plots")]) == 0
    assert mode(tmp_path / "plots" / "history.html") == 0o644
    assert mode(tmp_path / "plots" / "history.png") == 0o644


# -- fault injection: an update interrupted at every step leaves the old file or the complete new one


OS_STEPS = ("open", "write", "fsync", "close", "replace", "rename", "fchmod", "chmod", "unlink", "mkdir")


class Fault(Exception):
    """Raised in place of a step, or right after it, to stop the update there."""


@contextlib.contextmanager
def failing_at(step: int | None, error: type[BaseException], after: bool) -> Iterator[list[str]]:
    """Count every os-level step of a file write (and the lock); make step number ``step`` raise ``error``,
    before it runs or right after it did. Yields the names of the steps taken so far."""
    taken: list[str] = []
    originals = {name: getattr(os, name) for name in OS_STEPS}
    originals_flock = fcntl.flock

    def wrap(name: str, real: object) -> object:
        def step_fn(*args: object, **kwargs: object) -> object:
            index = len(taken)
            taken.append(name)
            if index == step and not after:
                raise error(f"injected before {name}")
            out = real(*args, **kwargs)  # type: ignore[operator]
            if index == step and after:
                raise error(f"injected after {name}")
            return out

        return step_fn

    for name, real in originals.items():
        setattr(os, name, wrap(name, real))
    fcntl.flock = wrap("flock", originals_flock)  # type: ignore[assignment]
    try:
        yield taken
    finally:
        for name, real in originals.items():
            setattr(os, name, real)
        fcntl.flock = originals_flock


def entry(value: int) -> Baseline:
    peaks = {"allocated": {"cpu": value}}
    return Baseline(metrics=peaks, phases={"setup": peaks, "call": peaks}, software={}, recorded="t", backend="cpu")


OLD_FILES = {
    "valid": store.dumps("cpu", {"t.py::a": store.committed(entry(MiB))}).encode(),
    "corrupt": b"{not json",
    "none": None,
}


@pytest.mark.parametrize("after", [False, True], ids=["before-step", "after-step"])
@pytest.mark.parametrize("error", [KeyboardInterrupt, OSError])
@pytest.mark.parametrize("old_file", list(OLD_FILES))
def test_an_update_stopped_at_any_step_leaves_the_old_file_or_the_new_one(tmp_path, old_file, error, after):
    old = OLD_FILES[old_file]
    entries = {"t.py::a": entry(2 * MiB), "t.py::b": entry(3 * MiB)}

    def setup(directory: Path) -> Path:
        directory.mkdir()
        if old is not None:
            (directory / "cpu.json").write_bytes(old)
        return directory / "cpu.json"

    clean = setup(tmp_path / "clean")
    with failing_at(None, error, after) as taken:
        store.BaselineStore(clean.parent, tolerate_unreadable=True).update("cpu", entries)
    new = clean.read_bytes()
    steps = len(taken)
    assert {"open", "write", "fsync", "replace", "flock"} <= set(taken)

    for k in range(steps):
        path = setup(tmp_path / f"k{k}")
        updater = store.BaselineStore(path.parent, tolerate_unreadable=True)
        raised: BaseException | None = None
        with failing_at(k, error, after):
            try:
                updater.update("cpu", entries)
            except BaseException as exc:  # noqa: BLE001 - what it raises is checked below
                raised = exc
        now = path.read_bytes() if path.exists() else None
        where = f"stopped {'after' if after else 'before'} step {k} ({taken[k]})"
        assert now in (old, new), where
        assert leftovers(path.parent) == [], where
        for backup in path.parent.glob("cpu.json.bak*"):
            assert backup.read_bytes() == old, where
        if raised is None:
            assert now == new, where  # a step whose failure is harmless (syncing the directory)
        elif error is KeyboardInterrupt:
            assert isinstance(raised, KeyboardInterrupt), where
            if isinstance(raised, atomic.Interrupted) and raised.path == path:
                assert raised.replaced == (now == new), where  # it says which file is there
        else:
            assert isinstance(raised, OSError), where


# -- interrupted runs do not change baselines


INTERRUPTED = """
import os, signal, pytest, torch

@pytest.mark.gpumem
def test_a():
    x = torch.empty(2 * 2**20, dtype=torch.uint8)

def test_b():
    os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C

@pytest.mark.gpumem
def test_c():
    x = torch.empty(2**20, dtype=torch.uint8)
"""


def test_an_interrupted_run_does_not_change_the_baselines(pytester):
    pytester.makepyfile(test_mem=SUITE.format(mib=1).replace("test_step", "test_a"))
    pytester.runpytest("--gpumem-update-baselines").assert_outcomes(passed=1)
    path = pytester.path / "baselines" / "cpu.json"
    before = path.read_bytes()
    pytester.makepyfile(test_mem=INTERRUPTED)
    result = pytester.runpytest_subprocess("--gpumem-update-baselines", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["gpumem: baselines not updated: the run was interrupted", "*KeyboardInterrupt*"])
    assert path.read_bytes() == before


def test_an_interrupted_first_run_writes_no_baselines(pytester):
    pytester.makepyfile(test_mem=INTERRUPTED)
    result = pytester.runpytest_subprocess("--gpumem-update-baselines", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(["gpumem: baselines not updated: the run was interrupted"])
    assert not (pytester.path / "baselines").exists()


CTRL_C_WHILE_WRITING = """
import os
import pytest

@pytest.hookimpl(tryfirst=True)
def pytest_sessionfinish(session):
    def interrupted(fd):
        raise KeyboardInterrupt  # Ctrl-C while the new baseline file is being flushed
    os.fsync = interrupted
"""


def test_ctrl_c_while_writing_prints_one_line_and_keeps_the_old_file(pytester):
    pytester.makepyfile(test_mem=SUITE.format(mib=1))
    pytester.runpytest("--gpumem-update-baselines").assert_outcomes(passed=1)
    path = pytester.path / "baselines" / "cpu.json"
    before = path.read_bytes()
    pytester.makepyfile(test_mem=SUITE.format(mib=2))
    pytester.makeconftest(CTRL_C_WHILE_WRITING)
    result = pytester.runpytest_subprocess("--gpumem-update-baselines", "-p", "no:cacheprovider")
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines(
        [f"gpumem: interrupted while writing {path}: it was left as it was; nothing after it was written"]
    )
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


# -- a file whose hardware field disagrees with its name


def foreign(hardware: str) -> str:
    peaks = {"allocated": {"cuda:0": 5 * 2**30}}
    baseline = Baseline(metrics=peaks, phases={"call": peaks}, software={}, recorded="t", backend="cuda")
    return store.dumps(hardware, {"test_mem.py::test_step": baseline})


@pytest.mark.parametrize("update", [False, True], ids=["run", "update"])
def test_a_misnamed_baseline_file_stops_the_run_and_is_never_written(pytester, update):
    path = pytester.path / "baselines" / "cpu.json"
    path.parent.mkdir()
    path.write_text(foreign("NVIDIA-H100-80GB-HBM3"))
    before = path.read_bytes()
    pytester.makepyfile(test_mem=SUITE.format(mib=1))
    result = pytester.runpytest(*(["--gpumem-update-baselines"] if update else []))
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        [
            f"ERROR: --gpumem-baselines (default): {path}: "
            "its 'hardware' field is 'NVIDIA-H100-80GB-HBM3' but its file name says 'cpu' "
            "(the file of 'NVIDIA-H100-80GB-HBM3' is NVIDIA-H100-80GB-HBM3.json); fix the field or rename the file"
        ]
    )
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["cpu.json"]


def test_a_file_that_turns_foreign_before_the_update_is_not_written(tmp_path):
    updater = store.BaselineStore(tmp_path)
    path = tmp_path / "cpu.json"
    path.write_text(foreign("cpu-but-not"))  # written by someone else after the run loaded the directory
    before = path.read_bytes()
    with pytest.raises(store.MisnamedFile, match=r"cpu\.json: its 'hardware' field is 'cpu-but-not'"):
        updater.update("cpu", {"t.py::a": entry(MiB)})
    assert path.read_bytes() == before


def test_a_second_unreadable_file_does_not_replace_the_first_backup(tmp_path):
    (tmp_path / "cpu.json.bak").write_text("first")
    (tmp_path / "cpu.json").write_text("second")
    summary = store.BaselineStore(tmp_path, tolerate_unreadable=True).update("cpu", {"t.py::a": entry(MiB)})
    assert summary.backup == tmp_path / "cpu.json.bak1"
    assert (tmp_path / "cpu.json.bak").read_text() == "first"
    assert (tmp_path / "cpu.json.bak1").read_text() == "second"


# -- the baseline file does not depend on how pytest-xdist scheduled the tests


SCHEDULED = """
import pytest, torch

@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    weights = torch.ones(2**20)  # 4 MiB while the checkpoint is made, then freed
    path = tmp_path_factory.mktemp("ckpt") / "w.pt"
    torch.save(weights, path)
    return path

@pytest.mark.gpumem
@pytest.mark.parametrize("kib", [64, 128, 256])
def test_{name}(checkpoint, kib):
    x = torch.empty(kib * 1024, dtype=torch.uint8)
"""

ORDER = """
import os

def pytest_collection_modifyitems(items):
    if os.environ.get("REVERSED"):
        items.reverse()
"""


def test_two_runs_scheduled_differently_write_the_same_baseline_file(pytester, monkeypatch):
    pytest.importorskip("xdist")
    pytester.makepyfile(test_one=SCHEDULED.format(name="one"), test_two=SCHEDULED.format(name="two"))
    pytester.makeconftest(ORDER)
    args = ("-n", "2", "--dist", "loadfile", "--gpumem-update-baselines", "-p", "no:cacheprovider")
    path = pytester.path / "baselines" / "cpu.json"

    def run(report: str) -> set[str]:
        """Runs the suite; the tests whose setup made the checkpoint (as the JSON report tells)."""
        pytester.runpytest_subprocess(*args, f"--gpumem-json={report}").assert_outcomes(passed=6)
        results = json.loads((pytester.path / report).read_text())["tests"]
        return {r["nodeid"] for r in results if r["sample"]["phases"]["setup"]["allocated"]["cpu"] >= 4 * MiB}

    first_makers = run("first.json")
    first = path.read_bytes()
    monkeypatch.setenv("REVERSED", "1")
    second_makers = run("second.json")
    assert len(first_makers) == len(second_makers) == 2 and first_makers != second_makers  # scheduled otherwise
    assert path.read_bytes() == first
    stored = json.loads(first)["tests"]
    assert len(stored) == 6 and all("setup" not in e["phases"] for e in stored.values())


def test_recording_the_same_figures_again_changes_nothing(tmp_path):
    updater = store.BaselineStore(tmp_path)
    updater.update("cpu", {"t.py::a": entry(MiB)})
    before = (tmp_path / "cpu.json").read_bytes()
    again = Baseline(**{**vars(entry(MiB)), "recorded": "later"})
    summary = updater.update("cpu", {"t.py::a": again})
    assert (summary.added, summary.replaced, summary.unchanged) == ([], [], ["t.py::a"])
    assert (tmp_path / "cpu.json").read_bytes() == before
    changed = Baseline(**{**vars(entry(2 * MiB)), "recorded": "later"})
    assert store.BaselineStore(tmp_path).update("cpu", {"t.py::a": changed}).replaced == ["t.py::a"]
    assert json.loads((tmp_path / "cpu.json").read_text())["tests"]["t.py::a"]["recorded"] == "later"


# -- what cannot be written stops the run before its first test


RAN = """
import pytest

@pytest.mark.gpumem
def test_step():
    open("ran", "w").close()
"""


def stopped_before_the_first_test(pytester: pytest.Pytester, result: pytest.RunResult) -> None:
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    assert not (pytester.path / "ran").exists()


def test_a_missing_pandas_stops_the_run_before_it_starts(pytester, monkeypatch):
    pytester.makepyfile(RAN)
    monkeypatch.setitem(sys.modules, "pandas", None)  # as if not installed
    result = pytester.runpytest("--gpumem-history=h.csv")
    stopped_before_the_first_test(pytester, result)
    result.stderr.fnmatch_lines(
        [
            "ERROR: --gpumem-history: cannot write */h.csv: the history needs pandas, which is not installed: "
            "pip install 'pytest-gpumem[[]history]'"
        ]
    )


def test_a_missing_pyarrow_stops_a_parquet_history_before_it_starts(pytester, monkeypatch):
    pytester.makepyfile(RAN)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    result = pytester.runpytest("--gpumem-history=h.parquet")
    stopped_before_the_first_test(pytester, result)
    result.stderr.fnmatch_lines(
        ["ERROR: --gpumem-history: cannot write */h.parquet: a .parquet history needs pyarrow, *: pip install pyarrow"]
    )


def test_a_baseline_directory_under_a_file_stops_an_update_before_it_starts(pytester):
    pytester.makepyfile(RAN)
    (pytester.path / "notes").write_text("a file")
    result = pytester.runpytest("--gpumem-update-baselines", "--gpumem-baselines=notes/baselines")
    stopped_before_the_first_test(pytester, result)
    result.stderr.fnmatch_lines(
        [
            "ERROR: --gpumem-update-baselines: cannot write baselines in */notes/baselines (--gpumem-baselines): "
            "*/notes is a file, not a directory"
        ]
    )


def test_the_error_names_an_ini_baseline_directory(pytester):
    pytester.makepyfile(RAN)
    pytester.makeini("[pytest]\ngpumem_baselines = notes/baselines\n")
    (pytester.path / "notes").write_text("a file")
    result = pytester.runpytest("--gpumem-update-baselines")
    stopped_before_the_first_test(pytester, result)
    result.stderr.fnmatch_lines(
        ["ERROR: --gpumem-update-baselines: cannot write baselines in */notes/baselines (ini option gpumem_baselines)*"]
    )


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into a read-only directory")
def test_a_read_only_baseline_directory_stops_an_update_before_it_starts(pytester):
    pytester.makepyfile(RAN)
    directory = pytester.path / "baselines"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        result = pytester.runpytest("--gpumem-update-baselines")
    finally:
        directory.chmod(0o755)
    stopped_before_the_first_test(pytester, result)
    result.stderr.fnmatch_lines(
        [
            "ERROR: --gpumem-update-baselines: cannot write baselines in */baselines "
            "(--gpumem-baselines (default)): */baselines is not writable"
        ]
    )


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        (
            "--gpumem-json",
            "notes/r.json",
            "--gpumem-json: cannot write */notes/r.json: */notes is a file, not a directory",
        ),
        ("--gpumem-markdown", "out", "--gpumem-markdown: cannot write */out: */out is a directory"),
        ("--gpumem-export", "bmf=b.json,gab=notes/g.json", "--gpumem-export: cannot write */notes/g.json: *a file*"),
        ("--gpumem-history", "notes/h.csv", "--gpumem-history: cannot write */notes/h.csv: */notes is a file*"),
        ("--gpumem-snapshot", "notes/snaps", "--gpumem-snapshot: cannot write snapshots in */notes/snaps: *a file*"),
    ],
)
def test_an_output_that_cannot_be_written_stops_the_run_before_it_starts(pytester, option, value, message):
    pytester.makepyfile(RAN)
    (pytester.path / "notes").write_text("a file")
    (pytester.path / "out").mkdir()
    result = pytester.runpytest(f"{option}={value}")
    stopped_before_the_first_test(pytester, result)
    result.stderr.fnmatch_lines(["ERROR: " + message])


BASELINES_TAKEN_AWAY = """
import pathlib, shutil, pytest, torch

@pytest.mark.gpumem
def test_step():
    x = torch.empty(2**20, dtype=torch.uint8)
    shutil.rmtree("baselines", ignore_errors=True)
    pathlib.Path("baselines").write_text("a file now")  # made unwritable while the suite ran
"""


def test_a_late_failure_says_what_could_not_be_written(pytester):
    pytester.makepyfile(BASELINES_TAKEN_AWAY)
    result = pytester.runpytest("--gpumem-update-baselines", "--gpumem-json=r.json")
    assert result.ret == pytest.ExitCode.INTERNAL_ERROR
    result.stdout.fnmatch_lines(["gpumem: could not write the baselines (--gpumem-update-baselines): *baselines*"])
    assert json.loads((pytester.path / "r.json").read_text())["tests"]  # the report is still written
