"""`make demo` runs `migrctl demo`: both acts must work end to end on this machine."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytestmark = pytest.mark.root


def test_demo_moves_the_counter_and_the_agents_spread_load():
    r = subprocess.run([sys.executable, "-m", "migrd.cli", "demo"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("live copies: 1 ") == 3
    assert "OK: one process, three hosts" in r.stdout
    assert "automatic moves, every workload kept its count, one copy each" in r.stdout
