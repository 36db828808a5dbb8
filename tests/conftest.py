from __future__ import annotations

import os
from pathlib import Path

import pytest

from workloads import Procs

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for CRIU and namespaces")


def pytest_collection_modifyitems(items):
    for item in items:
        if item.get_closest_marker("root"):
            item.add_marker(requires_root)


@pytest.fixture
def procs(tmp_path: Path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.cleanup()


@pytest.fixture
def migrd_config(tmp_path: Path, monkeypatch) -> Path:
    """A config whose state (CRIU logs) lives in the test's temp dir."""
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    monkeypatch.setenv("MIGRD_CONFIG", str(cfg))
    return cfg
