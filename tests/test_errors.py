"""Bad input: a one-line error naming the value and where it came from, and nothing lost."""

from __future__ import annotations

import json

import pytest
import torch

MEASURED = """
import pytest, torch

@pytest.mark.{marker}
def test_step():
    torch.empty(1024)
"""


def run_marker(pytester: pytest.Pytester, marker: str, *args: str) -> pytest.RunResult:
    pytester.makepyfile(test_mem=MEASURED.format(marker=marker))
    return pytester.runpytest(*args)


@pytest.mark.parametrize(
    ("marker", "message"),
    [
        ('gpumem(budget="6 GB?")', "gpumem marker of test_mem.py::test_step: budget: '6 GB?' is not a size*"),
        ('gpumem(budget="abc")', "gpumem marker of test_mem.py::test_step: budget: 'abc' is not a size*"),
        ("gpumem(budget=-5)", "gpumem marker of test_mem.py::test_step: budget: a size cannot be negative, got -5"),
        ('gpumem(tolerance="-1%")', "gpumem marker of test_mem.py::test_step: tolerance: '-1%' is not a tolerance*"),
        ('gpumem(tolerance="abc")', "gpumem marker of test_mem.py::test_step: tolerance: 'abc' is not a tolerance*"),
        ('gpumem(metric="vram")', "gpumem marker of test_mem.py::test_step: unknown metric 'vram'; choose one of*"),
        (
            'gpumem(metric="device")',
            "gpumem marker of test_mem.py::test_step: metric 'device' is not measured by the cpu backend*",
        ),
        (
            'gpumem(budgt="1 GiB")',
            "gpumem marker of test_mem.py::test_step: unknown keyword 'budgt'; did you mean 'budget'?",
        ),
        (
            'gpumem(excluzive=True, leak="1 MiB")',
            "gpumem marker of test_mem.py::test_step: unknown keyword 'excluzive'; did you mean 'exclusive'?",
        ),
        (
            'gpumem(colour="red")',
            "gpumem marker of test_mem.py::test_step: unknown keyword 'colour'; the keywords are budget, tolerance,*",
        ),
        (
            'gpumem("1 GiB", "2%", "allocated", 4)',
            "gpumem marker of test_mem.py::test_step: 4 positional arguments ('1 GiB', '2%', 'allocated', 4); "
            "it takes at most 3 (budget, tolerance, metric), the rest by keyword",
        ),
        (
            'gpumem("1 GiB", budget="2 GiB")',
            "gpumem marker of test_mem.py::test_step: budget is given twice, by position and by keyword",
        ),
        (
            'gpumem(budget_per_device={"cuda1": "1 GiB"})',
            "gpumem marker of test_mem.py::test_step: budget_per_device: 'cuda1' is not a device; write*",
        ),
        (
            'gpumem(budget_per_device={1: "lots"})',
            "gpumem marker of test_mem.py::test_step: budget_per_device[[]1[]]: 'lots' is not a size*",
        ),
        ('gpumem(exclusive="yes")', "gpumem marker of test_mem.py::test_step: exclusive: expected True or False*"),
    ],
)
def test_bad_marker_errors_that_test_in_one_line(pytester, marker, message):
    result = run_marker(pytester, marker)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines([message])
    out = result.stdout.str()
    assert "Traceback" not in out and "During handling" not in out
    assert len([line for line in result.outlines if line.startswith("gpumem marker of")]) == 1  # printed once
    assert "signature" not in out


def test_marker_budget_as_positional_and_int(pytester):
    run_marker(pytester, "gpumem(8192)").assert_outcomes(passed=1)
    run_marker(pytester, "gpumem(1000)").assert_outcomes(failed=1)


@pytest.mark.parametrize(
    ("args", "ini", "env", "message"),
    [
        (
            ["--gpumem-backend=tpu"],
            "",
            {},
            "ERROR: --gpumem-backend: unknown backend 'tpu'; choose one of auto, cuda, cpu, estimate",
        ),
        (["--gpumem-tolerance=-1%"], "", {}, "ERROR: --gpumem-tolerance: '-1%' is not a tolerance*"),
        ([], "gpumem_tolerance = abc", {}, "ERROR: ini option gpumem_tolerance: 'abc' is not a tolerance*"),
        ([], "gpumem_backend = gpu", {}, "ERROR: ini option gpumem_backend: unknown backend 'gpu'*"),
        ([], "gpumem_warn_only = maybe", {}, "ERROR: ini option gpumem_warn_only: 'maybe' is not a boolean*"),
        ([], "", {"GPUMEM_TOLERANCE": "5 parsecs"}, "ERROR: environment variable GPUMEM_TOLERANCE: '5 parsecs'*"),
        (["--gpumem-backend=cuda"], "", {}, "ERROR: --gpumem-backend cuda: no CUDA device is visible*"),
        (
            [],
            "gpumem_pack_margin = 200%",
            {},
            "ERROR: ini option gpumem_pack_margin: '200%' would keep the whole device free; "
            "a margin's percentage is under 100%",
        ),
        (["--gpumem-pack-margin=100%, 1 GiB"], "", {}, "ERROR: --gpumem-pack-margin: '100%, 1 GiB' would keep*"),
        (
            [],
            "",
            {"GPUMEM_GPUS_PER_WORKER": "\u00b2"},
            "ERROR: environment variable GPUMEM_GPUS_PER_WORKER: '\u00b2' is not*",
        ),
        (
            ["--gpumem-json=~no-such-user-here/x.json"],
            "",
            {},
            "ERROR: --gpumem-json: '~no-such-user-here/x.json': cannot*",
        ),
    ],
)
def test_bad_options_stop_the_run_naming_the_source(pytester, monkeypatch, args, ini, env, message):
    if "cuda" in " ".join(args) and torch.cuda.is_available():
        pytest.skip("a GPU is visible here")
    monkeypatch.delenv("GPUMEM_BACKEND")  # the source under test must be the one that speaks
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = run_marker(pytester, "gpumem", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines([message])


def test_cli_beats_environment_beats_ini(pytester, monkeypatch):
    pytester.makeini("[pytest]\ngpumem_tolerance = abc\n")
    monkeypatch.setenv("GPUMEM_TOLERANCE", "also bad")
    result = run_marker(pytester, "gpumem", "--gpumem-tolerance=3%")
    result.assert_outcomes(passed=1)
    monkeypatch.setenv("GPUMEM_TOLERANCE", "3%")
    run_marker(pytester, "gpumem").assert_outcomes(passed=1)


@pytest.mark.parametrize(
    ("args", "ini", "env", "source"),
    [
        ([], "", {}, "--gpumem-baselines (default)"),
        (["--gpumem-baselines=store"], "", {}, "--gpumem-baselines"),
        ([], "", {"GPUMEM_BASELINES": "store"}, "environment variable GPUMEM_BASELINES"),
        ([], "gpumem_baselines = store", {}, "ini option gpumem_baselines"),
    ],
)
def test_baseline_directory_that_is_a_file_names_the_setting(pytester, monkeypatch, args, ini, env, source):
    (pytester.path / "baselines").write_text("not a directory")
    (pytester.path / "store").write_text("not a directory")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    result = run_marker(pytester, "gpumem", *args)
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    name = "baselines" if source.endswith("(default)") else "store"
    result.stderr.fnmatch_lines([f"ERROR: {source}: *{name}: the baseline directory is a file, not a directory"])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "{not json",
            "*cpu.json: not valid JSON (Expecting property name enclosed in double quotes at line 1 column 2)",
        ),
        ('{"name": "some other tool"}', "*cpu.json: not a pytest-gpumem baseline file (schema None, expected*"),
        ("[1, 2]", "*cpu.json: not a pytest-gpumem baseline file (schema 'list', expected*"),
        (
            '{"schema": "pytest-gpumem/baselines/v1", "hardware": "cpu", "tests": {"t": {"metrics": '
            '{"allocated": {"cpu": "12 MiB"}}}}}',
            "*cpu.json: malformed entry for 't': allocated on cpu is '12 MiB', not an int of bytes",
        ),
        ('{"schema": "pytest-gpumem/baselines/v1", "hardware": "cpu"}', "*cpu.json: malformed baseline file*"),
    ],
)
def test_unreadable_baseline_stops_the_run_and_is_left_alone(pytester, content, message):
    path = pytester.path / "baselines" / "cpu.json"
    path.parent.mkdir()
    path.write_text(content)
    result = run_marker(pytester, "gpumem")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["ERROR: " + message])
    assert path.read_text() == content


def test_update_replaces_an_unreadable_baseline_and_keeps_it(pytester):
    path = pytester.path / "baselines" / "cpu.json"
    path.parent.mkdir()
    path.write_text("{not json")
    result = run_marker(pytester, "gpumem", "--gpumem-update-baselines")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        ["baselines: *cpu.json: 1 added, 0 replaced; the unreadable file it replaced is kept as *cpu.json.bak"]
    )
    assert (pytester.path / "baselines" / "cpu.json.bak").read_text() == "{not json"
    assert json.loads(path.read_text())["tests"]["test_mem.py::test_step"]["metrics"]["allocated"] == {"cpu": 4096}


def test_update_leaves_an_unreadable_file_of_other_hardware_alone(pytester):
    other = pytester.path / "baselines" / "NVIDIA-H100-80GB-HBM3.json"
    other.parent.mkdir()
    other.write_text("{not json")
    result = run_marker(pytester, "gpumem", "--gpumem-update-baselines")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["baselines: ignored while updating: *NVIDIA-H100-80GB-HBM3.json: not valid JSON*"])
    assert other.read_text() == "{not json"


def test_phase_name_must_be_a_name(pytester):
    pytester.makepyfile(
        """
        def test_step(gpumem):
            with gpumem.phase("call"):
                pass
        """
    )
    result = pytester.runpytest()
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*gpumem.phase: 'call' is not a phase name*"])
