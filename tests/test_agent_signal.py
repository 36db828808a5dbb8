"""SIGTERM to an agent in the middle of a migration it started (what `systemctl stop migrd`
does): the agent lets the migration finish, never cuts it in half, then exits by itself.
Real agents, CRIU and sshd on a 2-host bed; the migration is held at `transfer` for a few
seconds by a failpoint so the signal surely lands inside it.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import pytest

from migrbed import bed as bed_mod
from migrd import config as config_mod
from migrd.engine import failpoints
from migrd.engine.journal import FINAL, all_journals
from migrbed.programs import BUSY, read_counts
from test_agent_e2e import POLICY
from workloads import copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 2
PY = sys.executable


def test_sigterm_lets_the_migration_in_flight_finish(bed, run_in, monkeypatch, tmp_path: Path):
    for h in bed.hosts:
        path = h.dir / "etc" / "migrd.yaml"
        cfg = config_mod.parse(path.read_text())
        path.write_text(config_mod.dump(dataclasses.replace(cfg, policy=POLICY, daemon=dataclasses.replace(
            cfg.daemon, interval=1.0, peer_stale_after=10.0, probe_bytes=1 << 20))))
    monkeypatch.setenv(failpoints.ENV, "transfer:delay")  # inherited by the agents only
    deadline = time.time() + 150
    outs = [tmp_path / f"busy-{i}" for i in range(3)]
    h1 = bed.host("host1")
    try:
        bed_mod.start_agents(bed)
        for i, out in enumerate(outs):
            run_in("host1", PY, "-m", "migrd.cli", "run", "--name", f"busy{i}", "--", PY, "-c", BUSY,
                   str(out), str(deadline))

        def held_at_transfer():
            return next((j for j in all_journals(h1.dir / "state") if j.last_state() == "transfer"), None)

        journal = wait_for(held_at_transfer, timeout=120, what="host1's agent to start a migration")
        t0 = time.monotonic()
        bed_mod.stop_agent(h1, timeout=60)  # SIGTERM; SIGKILL only after 60 s
        took = time.monotonic() - t0
        assert took < 45, f"the agent needed {took:.1f} s to stop"
        assert journal.last_state() in FINAL and journal.merged().get("outcome") == "ok", \
            [r.state for r in journal.records()]
        for out in outs:
            got = read_counts(out)
            assert got == list(range(1, len(got) + 1)), f"{out.name} went backwards: {got[-20:]}"
            assert len(copies(str(out))) == 1
        before = [len(read_counts(o)) for o in outs]
        wait_for(lambda: all(len(read_counts(o)) > b for o, b in zip(outs, before)),
                 what="every workload to keep counting")
    finally:
        for h in bed.hosts:
            bed_mod.stop_agent(h)
        end_copies(*map(str, outs))
