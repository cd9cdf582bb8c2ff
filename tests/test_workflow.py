"""The GitHub Actions workflow: where GitHub reads it, valid against the published workflow schema (SchemaStore's,
vendored by check-jsonschema: no network), and running what this repository has."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def _check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows",
                           str(path)], capture_output=True, text=True)


def test_workflows_sit_where_github_reads_them_and_follow_its_schema():
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert [f.name for f in files] == ["ci.yml"]
    assert not (ROOT / "ci" / "workflows").exists()
    for f in files:
        result = _check_jsonschema(f)
        assert result.returncode == 0, result.stdout + result.stderr


def test_the_schema_check_catches_a_misspelt_key(tmp_path):
    bad = tmp_path / "ci.yml"
    bad.write_text((WORKFLOWS / "ci.yml").read_text().replace("runs-on:", "runs_on:", 1))
    result = _check_jsonschema(bad)
    assert result.returncode == 1 and "'runs-on' is a required property" in result.stdout


def test_the_linux_job_runs_the_ci_entry_point_and_every_path_it_names_exists():
    workflow = yaml.safe_load((WORKFLOWS / "ci.yml").read_text())
    runs = [step["run"] for job in workflow["jobs"].values() for step in job["steps"] if "run" in step]
    assert "bash .ci/run" in runs
    for command in runs:
        for path in re.findall(r"(?:\.ci|tests|ci)/[\w./-]+", command):
            assert (ROOT / path).exists(), f"{command!r} names {path}, which this repository lacks"
