"""The plugin end to end through pytester: real tensors of known size on the cpu backend."""

from __future__ import annotations

import json

import pytest
import torch

MiB = 2**20


def write_suite(pytester: pytest.Pytester, mib: float = 1, marker: str = "gpumem()") -> None:
    """One measured test that allocates ``mib`` MiB (and frees it), and one unmeasured test."""
    pytester.makepyfile(
        test_mem=f"""
        import pytest, torch

        @pytest.mark.{marker}
        def test_step():
            x = torch.empty({int(mib * MiB)}, dtype=torch.uint8)
            del x

        def test_unmeasured():
            torch.empty(10 * 2**20)
        """
    )


def baselines(pytester: pytest.Pytester, name: str = "cpu.json") -> dict:
    return json.loads((pytester.path / "baselines" / name).read_text())


def results(pytester: pytest.Pytester, *args: str) -> tuple[pytest.RunResult, dict]:
    result = pytester.runpytest("--gpumem-json=out.json", *args)
    return result, {t["nodeid"]: t for t in json.loads((pytester.path / "out.json").read_text())["tests"]}


def test_within_budget_passes_and_is_reported(pytester):
    write_suite(pytester, mib=1, marker='gpumem(budget="2 MiB")')
    result, tests = results(pytester)
    result.assert_outcomes(passed=2)
    assert list(tests) == ["test_mem.py::test_step"]  # only the marked test is measured
    assert tests["test_mem.py::test_step"]["sample"]["phases"]["call"]["allocated"] == {"cpu": MiB}
    result.stdout.fnmatch_lines(["*= gpumem =*", "test_mem.py::test_step*allocated*1.00 MiB*2.00 MiB*new*"])


def test_over_budget_fails_with_the_numbers(pytester):
    write_suite(pytester, mib=3, marker='gpumem(budget="2 MiB")')
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(
        [
            "gpumem: over budget (allocated peak, cpu backend, hardware cpu)",
            "*peak*3.00 MiB (3145728 B)",
            "*budget*2.00 MiB, exceeded by 1.00 MiB",
            "MEMORY test_mem.py::test_step*",
        ]
    )


def test_update_round_trip_then_ok(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines").assert_outcomes(passed=2)
    stored = baselines(pytester)
    entry = stored["tests"]["test_mem.py::test_step"]
    assert stored["hardware"] == "cpu"
    assert entry["metrics"]["allocated"] == {"cpu": MiB}
    assert list(entry["phases"]) == ["call"]  # setup's peak depends on the scheduling: not stored
    assert entry["software"]["torch"] == torch.__version__
    assert entry["recorded"].endswith("+00:00")
    text = (pytester.path / "baselines" / "cpu.json").read_text()
    assert text == json.dumps(stored, sort_keys=True, indent=2) + "\n"  # stable formatting

    result, tests = results(pytester)
    result.assert_outcomes(passed=2)
    assert tests["test_mem.py::test_step"]["verdict"]["status"] == "ok"
    assert tests["test_mem.py::test_step"]["verdict"]["baseline"] == MiB


def test_regression_over_tolerance_fails(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines")
    write_suite(pytester, mib=1.05)
    result = pytester.runpytest()
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["gpumem: regression over baseline*", "*delta*+51.20 KiB (+5.0%)*2%*", "*regression*"])


def test_growth_within_tolerance_and_absolute_floor_pass(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines")
    write_suite(pytester, mib=1.05, marker='gpumem(tolerance="2%, 64 KiB")')
    pytester.runpytest().assert_outcomes(passed=2)
    write_suite(pytester, mib=1.05, marker='gpumem(tolerance="5%")')
    result, tests = results(pytester)
    result.assert_outcomes(passed=2)
    assert tests["test_mem.py::test_step"]["verdict"]["status"] == "ok"


def test_improved_passes_and_suggests_rebaselining(pytester):
    write_suite(pytester, mib=2)
    pytester.runpytest("--gpumem-update-baselines")
    write_suite(pytester, mib=1)
    result, tests = results(pytester)
    result.assert_outcomes(passed=2)
    assert tests["test_mem.py::test_step"]["verdict"]["status"] == "improved"
    result.stdout.fnmatch_lines(["*improved*", "*--gpumem-update-baselines*"])


def test_other_library_versions_are_compared_and_named(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines")
    stored = baselines(pytester)
    stored["tests"]["test_mem.py::test_step"]["software"].update(transformers="4.57.6", torch="2.0.0")
    (pytester.path / "baselines" / "cpu.json").write_text(json.dumps(stored))
    write_suite(pytester, mib=2)
    result, tests = results(pytester)
    result.assert_outcomes(passed=1, failed=1)  # a bump is a regression like any other
    changes = tests["test_mem.py::test_step"]["verdict"]["software_changes"]
    assert changes[0].startswith("torch 2.0.0 -> ")
    assert changes[1].startswith("transformers 4.57.6 -> ")
    result.stdout.fnmatch_lines(["*software*torch 2.0.0 -> *transformers 4.57.6 -> *"])


def test_baselines_of_other_hardware_make_a_test_new_and_are_named(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines")
    stored = baselines(pytester)
    stored["hardware"] = "NVIDIA-H100-80GB-HBM3"
    (pytester.path / "baselines" / "cpu.json").rename(pytester.path / "baselines" / "NVIDIA-H100-80GB-HBM3.json")
    (pytester.path / "baselines" / "NVIDIA-H100-80GB-HBM3.json").write_text(json.dumps(stored))
    write_suite(pytester, mib=5)
    result, tests = results(pytester)
    result.assert_outcomes(passed=2)
    verdict = tests["test_mem.py::test_step"]["verdict"]
    assert verdict["status"] == "new"
    assert verdict["other_hardware"] == ["NVIDIA-H100-80GB-HBM3"]
    result.stdout.fnmatch_lines(["*NVIDIA-H100-80GB-HBM3*"])


def test_setup_leftovers_count_and_phases_are_recorded(pytester):
    pytester.makepyfile(
        f"""
        import pytest, torch

        @pytest.fixture
        def model():
            return torch.empty({MiB}, dtype=torch.uint8)

        def test_step(model, gpumem):
            with gpumem.phase("forward"):
                act = torch.empty({2 * MiB}, dtype=torch.uint8)
                assert gpumem.peak() == {3 * MiB}
            del act
            with gpumem.phase("optimizer"):
                torch.empty({MiB // 2}, dtype=torch.uint8)
        """
    )
    result, tests = results(pytester)
    result.assert_outcomes(passed=1)
    phases = {
        name: peaks["allocated"]["cpu"]
        for name, peaks in tests["test_setup_leftovers_count_and_phases_are_recorded.py::test_step"]["sample"][
            "phases"
        ].items()
    }
    assert phases == {"setup": MiB, "call": 3 * MiB, "forward": 3 * MiB, "optimizer": MiB + MiB // 2}


def test_gpumem_all_measures_every_test(pytester):
    write_suite(pytester, mib=1)
    _result, tests = results(pytester, "--gpumem-all")
    assert tests["test_mem.py::test_unmeasured"]["sample"]["phases"]["call"]["allocated"] == {"cpu": 40 * MiB}


def test_warn_only_reports_without_failing(pytester):
    write_suite(pytester, mib=3, marker='gpumem(budget="2 MiB")')
    result = pytester.runpytest("--gpumem-warn-only")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*over budget (warn)*", "*not enforced*"])


def test_warn_only_from_ini(pytester):
    write_suite(pytester, mib=3, marker='gpumem(budget="2 MiB")')
    pytester.makeini("[pytest]\ngpumem_warn_only = true\n")
    pytester.runpytest().assert_outcomes(passed=2)


def test_update_does_not_record_failed_or_over_budget_tests(pytester):
    pytester.makepyfile(
        test_mem="""
        import pytest, torch

        @pytest.mark.gpumem(budget="1 MiB")
        def test_over():
            x = torch.empty(2 * 2**20, dtype=torch.uint8)

        @pytest.mark.gpumem
        def test_fails():
            x = torch.empty(2**20, dtype=torch.uint8)
            assert False

        @pytest.mark.gpumem
        def test_good():
            x = torch.empty(2**20, dtype=torch.uint8)
        """
    )
    result = pytester.runpytest("--gpumem-update-baselines")
    result.assert_outcomes(passed=1, failed=2)
    assert list(baselines(pytester)["tests"]) == ["test_mem.py::test_good"]
    result.stdout.fnmatch_lines(["baselines: *cpu.json: 1 added, 0 replaced"])


def test_regression_does_not_fail_while_updating_and_is_replaced(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines")
    write_suite(pytester, mib=2)
    result = pytester.runpytest("--gpumem-update-baselines")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["baselines: *cpu.json: 0 added, 1 replaced"])
    assert baselines(pytester)["tests"]["test_mem.py::test_step"]["metrics"]["allocated"] == {"cpu": 2 * MiB}


def test_other_entries_in_the_file_are_kept(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-update-baselines")
    stored = baselines(pytester)
    stored["tests"]["test_gone.py::test_old"] = stored["tests"]["test_mem.py::test_step"]
    (pytester.path / "baselines" / "cpu.json").write_text(json.dumps(stored))
    pytester.runpytest("--gpumem-update-baselines")
    assert sorted(baselines(pytester)["tests"]) == ["test_gone.py::test_old", "test_mem.py::test_step"]


def test_markdown_and_step_summary(pytester, monkeypatch):
    write_suite(pytester, mib=3, marker='gpumem(budget="2 MiB")')
    summary = pytester.path / "summary.md"
    summary.write_text("earlier\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    pytester.runpytest("--gpumem-markdown=report.md")
    text = (pytester.path / "report.md").read_text()
    assert "| `test_mem.py::test_step` |" in text
    assert "over budget" in text
    assert summary.read_text() == "earlier\n" + text


def test_json_schema_and_summary(pytester):
    write_suite(pytester, mib=1)
    pytester.runpytest("--gpumem-json=out.json")
    doc = json.loads((pytester.path / "out.json").read_text())
    assert doc["schema"] == "pytest-gpumem/results/v1"
    assert doc["summary"]["new"] == 1
    assert doc["environment"]["hardware"] == ["cpu"]
    assert "torch" in doc["environment"]["software"]
    test = doc["tests"][0]
    assert test["verdict"]["metric"] == "allocated"
    assert test["verdict"]["value"] == MiB


def test_json_is_written_when_nothing_was_measured(pytester):
    pytester.makepyfile("def test_plain(): pass")
    pytester.runpytest("--gpumem-json=out.json").assert_outcomes(passed=1)
    doc = json.loads((pytester.path / "out.json").read_text())
    assert doc["tests"] == [] and doc["summary"]["ok"] == 0


def test_plugin_can_be_disabled(pytester):
    write_suite(pytester, mib=3, marker='gpumem(budget="2 MiB")')
    result = pytester.runpytest("-p", "no:gpumem", "-W", "ignore::pytest.PytestUnknownMarkWarning")
    result.assert_outcomes(passed=2)
    assert "gpumem" not in result.stdout.str()


def test_report_header_names_backend_and_baselines(pytester):
    write_suite(pytester)
    pytester.runpytest().stdout.fnmatch_lines(["gpumem: backend cpu, baselines *baselines [[]none yet[]]"])


def test_failure_keeps_its_traceback_but_later_tests_measure_clean(pytester):
    pytester.makepyfile(
        """
        import pytest, torch

        @pytest.mark.gpumem
        def test_fails_holding_memory():
            big = torch.empty(8 * 2**20, dtype=torch.uint8)
            assert False

        @pytest.mark.gpumem(budget="1 MiB")
        def test_small():
            torch.empty(2**20, dtype=torch.uint8)
        """
    )
    pytester.runpytest().assert_outcomes(passed=1, failed=1)
