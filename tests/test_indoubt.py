"""Recovery where it is hardest: a target lost after its restore began (exit 11, nothing
restarted, `migrctl recover` settles it), an agent starting with an unfinished migration or
with broken journals, a migration whose lock a dump's CRIU still holds, and an agent's systemd
watchdog through a long migration. Real CRIU, sshd and agents on a 2-host bed where a migration
is needed; a local agent otherwise."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migrd.agent import admin
from migrd.engine import failpoints
from migrbed import bed as bed_mod
from migrd import config as config_mod
from migrd.errors import InDoubt, MigrdError
from migrd.engine.journal import FINAL, Journal, all_journals
from migrbed.programs import BUSY, read_counts
from test_agent_e2e import POLICY
from test_migrate import counter, jrun, mig  # noqa: F401 (fixtures)
from workloads import copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 2
PY = sys.executable


@pytest.fixture
def host1_ssh(bed):
    """Change host1's ssh settings for one test; the config is put back after it."""
    path = bed.host("host1").dir / "etc" / "migrd.yaml"
    original = path.read_text()

    def change(**ssh: object) -> None:
        cfg = config_mod.parse(original)
        path.write_text(config_mod.dump(dataclasses.replace(cfg, ssh=dataclasses.replace(cfg.ssh, **ssh))))

    yield change
    path.write_text(original)


def counting(out: Path) -> bool:
    before = len(read_counts(out))
    time.sleep(1.0)  # the counter writes every 0.05 s
    return len(read_counts(out)) > before


def test_target_lost_after_restore_is_in_doubt_until_recover(mig, bed, run_in, counter, host1_ssh):  # noqa: F811
    host1_ssh(op_timeout=20.0)  # how long each step waits for the lost target
    pid, out = counter()
    state = bed.host("host1").dir / "state"
    # Held 5 s at verify: the target has restored its copy and waits for our word.
    p = bed_mod.spawn_in(bed, "host1", ["env", f"{failpoints.ENV}=verify:delay", PY, "-m", "migrd.cli",
                                        "migrate", str(pid), "--to", "host2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: any(j.last_state() == "verify" for j in all_journals(state)), timeout=120,
                 what="the migration to reach verify")
        run_in("host2", "ip", "link", "set", "eth0", "down")
        _, err = p.communicate(timeout=300)
        line = err.decode().strip()
        assert p.returncode == InDoubt.exit_code, line
        # In doubt at verify or, when verify still got its answer on the open session, at the
        # commit: either way one line, exit 11, and the way out named.
        assert "\n" not in line and "migrd recover" in line, line
        # The source is gone, the target's copy is stopped: one process, and nothing counts.
        assert pid not in copies(str(out)) and len(copies(str(out))) == 1
        assert not counting(out)
        # While the target cannot be asked, recover keeps it in doubt and restarts nothing.
        report = jrun(mig, "host1", "recover")
        assert report and all(r["action"].startswith("failed: ") for r in report), report
        assert len(copies(str(out))) == 1 and not counting(out)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=30)
        run_in("host2", "ip", "link", "set", "eth0", "up")

    def settled():
        report = jrun(mig, "host1", "recover")
        return report if report and all(r["action"] == "committed" for r in report) else None

    report = wait_for(settled, timeout=180, what="recover to commit once host2 answers")
    assert len(report) == 1
    assert all(j.last_state() in FINAL for j in all_journals(state))
    wait_for(lambda: counting(out), timeout=30, what="the counter to run on host2")
    assert len(copies(str(out))) == 1
    counts = read_counts(out)
    assert counts == list(range(1, len(counts) + 1)), counts[-20:]


def test_agent_recovers_an_unfinished_migration_at_start(mig, bed, counter):  # noqa: F811
    pid, out = counter()
    state = bed.host("host1").dir / "state"
    # The orchestrator dies right after journaling `transfer`: the dump is done, nothing sent.
    r = mig("host1", "migrate", pid, "--to", "host2", check=False, env={failpoints.ENV: "transfer:die"})
    assert r.returncode != 0
    unfinished = [j for j in all_journals(state) if j.last_state() not in FINAL]
    assert [j.last_state() for j in unfinished] == ["transfer"]
    try:
        bed_mod.start_agents(bed)  # returns once host1's agent answers: after its recovery
        assert unfinished[0].last_state() == "rolled_back", [r.state for r in unfinished[0].records()]
        wait_for(lambda: counting(out), timeout=30, what="the counter to run again on host1")
        assert len(copies(str(out))) == 1
        counts = read_counts(out)
        assert counts == list(range(1, len(counts) + 1)), counts[-20:]
    finally:
        for h in bed.hosts:
            bed_mod.stop_agent(h)


# --------------------------------------------------------------------------- without a bed


def local_config(tmp_path: Path) -> Path:
    path = tmp_path / "migrd.yaml"
    path.write_text(f"state_dir: {tmp_path / 'state'}\nhost: a\ndaemon:\n  interval: 5\n"
                    f"  socket: {tmp_path / 'run' / 'migrd.sock'}\n")
    return path


def unfinished(tmp_path: Path, mid: str) -> Journal:
    """A migration interrupted before its checkpoint (recovery needs no peer for it)."""
    j = Journal(tmp_path / "state" / "migrations" / mid)
    j.record("precheck", options={"target": "b"}, request={"pid": 1, "start_time": 0.0})
    return j


def test_a_corrupt_journal_does_not_stop_the_agent(tmp_path: Path) -> None:
    """Needs the start-up guard of the `readers` branch: without it the agent dies on start."""
    root = tmp_path / "state" / "migrations"
    for mid, line in [("20260101-000000000-aaaaaa", '{"state": "checkpoint", "time": 1.0, "data": {}}'),
                      ("20260101-000000001-bbbbbb", '["not", "a", "record"]')]:
        (root / mid).mkdir(parents=True)
        (root / mid / "journal.jsonl").write_text(line + "\n")
    good = unfinished(tmp_path, "20260101-000000002-cccccc")  # sorted after the broken ones
    env = {**os.environ, "MIGRD_CONFIG": str(local_config(tmp_path))}
    p = subprocess.Popen([PY, "-m", "migrd.agent.daemon"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def answers() -> bool:
            assert p.poll() is None, p.stderr.read().decode()[-2000:]
            try:
                return admin.request(tmp_path / "run" / "migrd.sock", "status", timeout=5)["pid"] == p.pid
            except MigrdError:
                return False

        wait_for(answers, timeout=60, what="the agent to come up")
        assert good.last_state() == "rolled_back"
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_recover_skips_a_migration_whose_lock_a_dump_still_holds(tmp_path: Path) -> None:
    """The orchestrator hands its journal lock to CRIU (pass_fds), so a dump outliving a killed
    orchestrator keeps the migration locked. A child holding the inherited fd stands in for
    that CRIU: recover must leave the migration alone, say so, and act once it is gone."""
    j = unfinished(tmp_path, "20260101-000000000-dddddd")
    fd = j.lock()
    assert fd is not None
    holder = subprocess.Popen(["sleep", "600"], pass_fds=(fd,))
    os.close(fd)  # the orchestrator is gone; only the "CRIU" holds the lock now
    env = {**os.environ, "MIGRD_CONFIG": str(local_config(tmp_path))}

    def recover() -> list[dict]:
        r = subprocess.run([PY, "-m", "migrd.cli", "recover", "--json"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    try:
        assert j.lock(blocking=False) is None
        assert recover() == [{"id": j.id, "action": "skipped: still in progress"}]
        assert j.last_state() == "precheck"
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert [r["action"] for r in recover()] == ["nothing had changed"]
    assert j.last_state() == "rolled_back"


def test_watchdog_is_fed_through_a_real_long_migration(bed, run_in, tmp_path: Path) -> None:
    """host1's agent, under a 3 s watchdog, moves a busy workload to host2 with the migration
    held 5 s at `transfer` (the failpoint): the agent's loop is blocked all that time, and
    WATCHDOG=1 must still come at most 1.5 s (half the period) apart."""

    originals = {h.name: (h.dir / "etc" / "migrd.yaml").read_text() for h in bed.hosts}
    for h in bed.hosts:
        cfg = config_mod.parse(originals[h.name])
        (h.dir / "etc" / "migrd.yaml").write_text(config_mod.dump(dataclasses.replace(
            cfg, policy=POLICY, daemon=dataclasses.replace(cfg.daemon, interval=1.0, peer_stale_after=10.0,
                                                            probe_bytes=1 << 20))))
    notify = tmp_path / "notify"
    state = bed.host("host1").dir / "state"
    outs = [tmp_path / f"busy-{i}" for i in range(3)]
    agents = []
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(str(notify))
        sock.settimeout(0.1)
        env = {**os.environ, "NOTIFY_SOCKET": str(notify), "WATCHDOG_USEC": "3000000",
               failpoints.ENV: "transfer:delay"}
        for h, extra in (("host2", {}), ("host1", env)):
            with open(bed.host(h).dir / "state" / "agent.log", "ab") as log:
                agents.append(bed_mod.spawn_in(bed, h, [PY, "-m", "migrd.agent.daemon"], stdout=log, stderr=log,
                                               env=extra or None))
        deadline = time.time() + 150
        for i, out in enumerate(outs):
            run_in("host1", PY, "-m", "migrd.cli", "run", "--name", f"wd{i}", "--", PY, "-c", BUSY, str(out),
                   str(deadline))
        pings: list[float] = []
        held: list[float] = []  # the times host1's migration was seen held at transfer
        until = time.monotonic() + 150
        while time.monotonic() < until and not (held and time.time() - held[-1] > 2.0):
            try:
                if b"WATCHDOG=1" in sock.recv(4096):
                    pings.append(time.time())
            except socket.timeout:
                pass
            if any(j.last_state() == "transfer" for j in all_journals(state)):
                held.append(time.time())
        assert held, "host1's agent never started a migration"
    finally:
        sock.close()
        for p in agents:
            p.terminate()
        for p in agents:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=30)
        for h in bed.hosts:
            (h.dir / "etc" / "migrd.yaml").write_text(originals[h.name])
        end_copies(*map(str, outs))
    assert held[-1] - held[0] >= 3.0, "the hold at transfer was not seen"
    during = [held[0], *(t for t in pings if held[0] < t < held[-1]), held[-1]]
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert len(during) >= 4 and max(gaps) <= 1.5, (gaps, held[-1] - held[0])
