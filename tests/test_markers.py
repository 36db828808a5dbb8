"""Test markers are this run's own (tests/workloads.py): two test runs side by side must never
count or kill each other's workload copies."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import workloads


def test_a_marker_carries_this_runs_token_and_paths_under_its_tmp_dir_are_ours(tmp_path):
    assert workloads.RUN_TOKEN in workloads.marker("svc") and workloads.of_this_run(workloads.marker("svc"))
    assert workloads.of_this_run(str(tmp_path / "count"))
    assert workloads.copies(str(tmp_path / "count")) == []


@pytest.mark.parametrize("foreign", ["s.bind((sys.argv[1], 8080))", "migrd-test-ct123", "/tmp/other-run/count"])
def test_a_marker_another_run_could_share_is_refused(foreign):
    with pytest.raises(ValueError, match="another test run"):
        workloads.copies(foreign)
    with pytest.raises(ValueError):
        workloads.end_copies(foreign)


def test_two_runs_get_different_tokens():
    cmd = [sys.executable, "-c", "import workloads; print(workloads.RUN_TOKEN)"]
    tokens = {subprocess.run(cmd, cwd=Path(__file__).parent, capture_output=True, text=True, check=True).stdout for _ in range(2)}
    assert len(tokens) == 2
