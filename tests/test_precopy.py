"""`--strategy precopy` between bed hosts: real namespaces, real sshd, real CRIU, on a kernel
without soft-dirty tracking (pages found changed by content)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from migrd.engine.journal import Journal, all_journals
from migrbed.programs import COUNTER, MARK, read_counts
from workloads import SERVER, copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 2
PY = sys.executable

#: Rewrites argv[3] KiB of its argv[2] MiB of random memory every 20 ms, the same bytes into a
#: shadow copy; each round compares the two (memory lost or mixed up by a move shows as BAD)
#: and appends the round number to argv[1].
REWRITER = f"""
import os, sys, time  # {MARK}
path, size, stripe = sys.argv[1], int(sys.argv[2]) << 20, int(sys.argv[3]) << 10
buf = bytearray(os.urandom(size)); shadow = bytearray(buf)
rnd, at, deadline = 0, 0, time.time() + 600
while time.time() < deadline:
    bad = buf != shadow
    rnd += 1
    chunk = os.urandom(stripe)
    buf[at:at + stripe] = chunk; shadow[at:at + stripe] = chunk
    at = (at + stripe) % size
    with open(path, "a") as f:
        f.write(("BAD" if bad else str(rnd)) + "\\n")
    time.sleep(0.02)
"""


@pytest.fixture(scope="module")
def mig(run_in):
    def call(host: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return run_in(host, *prefix, PY, "-m", "migrd.cli", *map(str, args), check=False, timeout=timeout)

    return call


def start(mig, out: Path, *argv: str) -> int:
    r = mig("host1", "run", "--json", "--name", f"p{int(time.time() * 1000) % 10**8}", "--", PY, "-c", *argv)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)["pid"]


def precopy(mig, pid: int, env: dict[str, str] | None = None):
    return mig("host1", "migrate", "--json", pid, "--to", "host2", "--strategy", "precopy", env=env, timeout=180)


def journal(bed, mid: str) -> Journal:
    return Journal(bed.host("host1").dir / "state" / "migrations" / mid)


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def goes_on(out: Path, n: int = 5) -> list[str]:
    before = len(lines(out))
    wait_for(lambda: len(lines(out)) >= before + n, what=f"{out.name} to go on")
    got = lines(out)
    assert "BAD" not in got and got == [str(i) for i in range(1, len(got) + 1)], got[-20:]
    return got


def test_counter_moves_after_rounds_that_say_why_they_stopped(mig, bed, tmp_path):
    out = tmp_path / "count"
    pid = start(mig, out, COUNTER, str(out))
    try:
        wait_for(lambda: len(read_counts(out)) >= 3, what="counter")
        r = precopy(mig, pid)
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        assert res["strategy"] == "precopy" and copies(str(out)) == [res["target_pid"]]
        goes_on(out)
        d = journal(bed, res["id"]).merged()
        assert d["rounds"] >= 2 and d["stop_reason"] and d["final_page_bytes"] > 0
        # Most of the dump's pages were there before the freeze.
        assert d["final_sent_bytes"] < d["final_page_bytes"] / 2, d
        assert not (bed.host("host2").dir / "state" / "incoming" / res["id"]).exists()
    finally:
        end_copies(str(out))


#: Holds its data file (argv[1]) open, as a database holds its table, and counts into argv[2].
DATA_HOLDER = f"""
import sys, time  # {MARK}
data = open(sys.argv[1], "rb")
n, deadline = 0, time.time() + 600
while time.time() < deadline:
    n += 1
    with open(sys.argv[2], "a") as o:
        o.write(f"{{n}}\\n")
    time.sleep(0.05)
"""


def test_carried_data_file_is_read_ahead_and_only_its_change_crosses_in_the_freeze(mig, run_in, bed, tmp_path):
    out = tmp_path / "count"
    data = "/srv/migrd/table-" + tmp_path.name
    run_in("host1", "sh", "-c", 'head -c 4194304 /dev/urandom > "$0"', data)
    pid = start(mig, out, DATA_HOLDER, data, str(out))
    try:
        wait_for(lambda: len(lines(out)) >= 3, what="data holder")
        r = mig("host1", "migrate", "--json", pid, "--to", "host2", "--strategy", "precopy", "--with-files",
                timeout=180)
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        goes_on(out)
        theirs = run_in("host2", "sha256sum", data).stdout.split()[0]
        assert theirs == run_in("host1", "sha256sum", data).stdout.split()[0]
        d = journal(bed, res["id"]).merged()
        assert data in d["carry"] and d["carried_bytes"] >= 4 << 20
        # The table crossed in the rounds: the freeze sent little more than the pages that
        # changed (the counter's log grows; the table did not change).
        assert d["final_sent_bytes"] < 1 << 20, d
    finally:
        end_copies(str(out))


def test_tcp_server_keeps_its_state(mig, run_in, tmp_path):
    portfile = tmp_path / "port"
    pid = start(mig, portfile, SERVER, str(portfile))
    try:
        wait_for(portfile.exists, what="server to listen")
        port = int(portfile.read_text())
        ask = ["-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                     f"from workloads import ask; print(ask({port}))"]
        assert [int(run_in("host1", PY, *ask).stdout) for _ in range(2)] == [1, 2]
        r = precopy(mig, pid)
        assert r.returncode == 0, r.stderr.decode()
        assert int(run_in("host2", PY, *ask).stdout) == 3
    finally:
        end_copies(str(portfile))


def test_memory_rewritten_during_the_move_arrives_intact(mig, bed, tmp_path):
    out = tmp_path / "rounds"
    pid = start(mig, out, REWRITER, str(out), "32", "256")
    try:
        wait_for(lambda: len(lines(out)) >= 3, what="rewriter to start")
        r = precopy(mig, pid)
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        goes_on(out)
        assert copies(str(out)) == [res["target_pid"]]
        d = journal(bed, res["id"]).merged()
        assert d["dirty_rate"] and d["dirty_rate"] > 0
        assert d["final_sent_bytes"] < d["final_page_bytes"]
    finally:
        end_copies(str(out))


@pytest.mark.parametrize("point,kind,recovered", [
    ("round1", "error", None), ("round2", "die", "rolled back"), ("precopy", "die", "rolled back"),
    ("checkpoint", "error", None), ("transfer", "die", "rolled back"), ("restore", "error", None),
])
def test_failures_in_and_after_the_rounds_leave_exactly_one_copy(mig, bed, tmp_path, point, kind, recovered):
    out = tmp_path / "count"
    pid = start(mig, out, COUNTER, str(out))
    try:
        wait_for(lambda: len(read_counts(out)) >= 3, what="counter")
        r = precopy(mig, pid, env={"MIGRD_FAILPOINTS": f"{point}:{kind}"})
        [j] = [j for j in all_journals(bed.host("host1").dir / "state")
               if j.merged().get("request", {}).get("pid") == pid]
        if kind == "die":
            assert r.returncode in (-9, 137), r.stderr
            acts = [a["action"] for a in json.loads(mig("host1", "recover", "--json").stdout) if a["id"] == j.id]
            assert acts and acts[0].startswith(recovered), acts
        else:
            assert r.returncode == 1 and f"failpoint {point}:error".encode() in r.stderr, r.stderr
        wait_for(lambda: len(copies(str(out))) == 1, timeout=30, what="exactly one copy")
        n = len(read_counts(out))
        wait_for(lambda: len(read_counts(out)) >= n + 3, what="the one copy to go on")
        got = read_counts(out)
        assert got == list(range(1, len(got) + 1))
        assert len(copies(str(out))) == 1
        assert not (bed.host("host2").dir / "state" / "incoming" / j.id).exists()
    finally:
        end_copies(str(out))


def test_auto_measures_chooses_and_says_what_ran(mig, bed, tmp_path):
    out = tmp_path / "count"
    pid = start(mig, out, COUNTER, str(out))
    try:
        wait_for(lambda: len(read_counts(out)) >= 3, what="counter")
        r = mig("host1", "migrate", "--json", pid, "--to", "host2", "--strategy", "auto", timeout=180)
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        names = {"stop-copy", "stream-copy", "postcopy", "precopy"}
        assert res["strategy"] in names and copies(str(out)) == [res["target_pid"]]
        assert {e.split(":")[0] for e in res["estimates"]} <= names and len(res["estimates"]) >= 3
        assert res["downtime"] is not None
        d = journal(bed, res["id"]).merged()
        assert d["link_bandwidth"] > 0 and d["sampled_dirty_rate"] >= 0
        # Its measuring is a phase of its own; the choice is an event, then the chosen one's phases.
        assert "measure" in res["phases"] and "auto" not in res["phases"], res["phases"]
        n = len(read_counts(out))
        wait_for(lambda: len(read_counts(out)) >= n + 3, what="counter to go on")
    finally:
        end_copies(str(out))


@pytest.mark.parametrize("kind,recovered", [("error", None), ("die", "nothing had changed")])
def test_autos_measuring_interrupted_leaves_the_one_copy(mig, bed, tmp_path, kind, recovered):
    out = tmp_path / "count"
    pid = start(mig, out, COUNTER, str(out))
    try:
        wait_for(lambda: len(read_counts(out)) >= 3, what="counter")
        r = mig("host1", "migrate", "--json", pid, "--to", "host2", "--strategy", "auto",
                env={"MIGRD_FAILPOINTS": f"measure:{kind}"}, timeout=180)
        [j] = [j for j in all_journals(bed.host("host1").dir / "state")
               if j.merged().get("request", {}).get("pid") == pid]
        if kind == "die":
            assert r.returncode in (-9, 137), r.stderr
            acts = [a["action"] for a in json.loads(mig("host1", "recover", "--json").stdout) if a["id"] == j.id]
            assert acts == [recovered], acts
        else:
            assert r.returncode == 1 and b"failpoint measure:error" in r.stderr, r.stderr
        assert copies(str(out)) == [pid]
        n = len(read_counts(out))
        wait_for(lambda: len(read_counts(out)) >= n + 3, what="the one copy to go on")
        assert not (bed.host("host2").dir / "state" / "incoming" / j.id).exists()
    finally:
        end_copies(str(out))


@pytest.fixture(scope="module")
def tight_env(bed) -> dict[str, str]:
    """host1's config with a downtime target no dump can meet: hybrid then switches by post-copy."""
    import dataclasses

    from migrd import config as config_mod

    etc = bed.host("host1").dir / "etc"
    cfg = config_mod.parse((etc / "migrd.yaml").read_text())
    cfg = dataclasses.replace(cfg, migrate=dataclasses.replace(cfg.migrate, downtime_target=0.001))
    (etc / "tight.yaml").write_text(config_mod.dump(cfg))
    return {"MIGRD_CONFIG": "/etc/migrd/tight.yaml"}


@pytest.mark.parametrize("tight", [False, True], ids=["stop-copy", "postcopy"])
def test_hybrid_switches_as_the_prediction_says_and_records_it(mig, bed, tmp_path, tight_env, tight):
    out = tmp_path / "rounds"
    pid = start(mig, out, REWRITER, str(out), "16", "64")
    try:
        wait_for(lambda: len(lines(out)) >= 3, what="rewriter to start")
        r = mig("host1", "migrate", "--json", pid, "--to", "host2", "--strategy", "hybrid",
                env=tight_env if tight else None, timeout=180)
        assert r.returncode == 0, r.stderr.decode()
        res = json.loads(r.stdout)
        assert res["strategy"] == "hybrid"
        assert res["hybrid_switch"] == ("postcopy" if tight else "stop-copy")
        goes_on(out)
        assert copies(str(out)) == [res["target_pid"]]
        hist = json.loads(mig("host1", "history", "--json").stdout)
        assert any(h["id"] == res["id"] and h["strategy"] == f"hybrid: {res['hybrid_switch']}" for h in hist), hist
    finally:
        end_copies(str(out))
