"""Post-copy (lazy pages) between bed hosts with migrd.engine.lazy's pieces: real CRIU, real
sshd, every page inside the SSH session. Needs fs.pipe-max-size >= 4 MiB (`make setup`)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from migrbed import bed as bed_mod
from migrbed.programs import COUNTER, MARK, read_counts
from migrd.adapters import criu as criu_mod
from migrd.engine.journal import Journal, all_journals
from workloads import SERVER, copies, end_copies, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 2
PY = sys.executable
DRIVER = str(Path(__file__).with_name("postcopy_drive.py"))


@pytest.fixture(scope="module", autouse=True)
def lazy_ready():
    why = criu_mod.lazy_unready_reason({"uffd-noncoop": True}, criu_mod.pipe_max_size())
    if why:
        pytest.skip(why)


@pytest.fixture(scope="module")
def mig(run_in):
    def call(host: str, *args: str, env: dict[str, str] | None = None, timeout: float = 120):
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        return run_in(host, *prefix, PY, *map(str, args), check=False, timeout=timeout)

    return call


@pytest.fixture
def counter(mig, bed, tmp_path):
    """Start counters with `migrctl run`; afterwards end every copy, and keep the hosts' CRIU
    logs in the test's temp dir (the bed's own go with it)."""
    started: list[Path] = []

    def start(host: str = "host1", *extra: str) -> tuple[int, Path]:
        out = tmp_path / f"count-{len(started)}"
        started.append(out)
        r = mig(host, "-m", "migrd.cli", "run", "--json", "--name", f"c{int(time.time() * 1000) % 10**8}",
                "--", PY, "-c", COUNTER, str(out), *extra)
        assert r.returncode == 0, r.stderr.decode()
        wait_for(lambda: len(read_counts(out)) >= 5, what="counter to start")
        return json.loads(r.stdout)["pid"], out

    yield start
    end_copies(*map(str, started))
    for h in ("host1", "host2"):
        shutil.copytree(bed.host(h).dir / "state" / "logs", tmp_path / f"logs-{h}", dirs_exist_ok=True)


def bed_spawn(bed, argv: list[str]):
    import subprocess

    return bed_mod.spawn_in(bed, "host1", argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def journal(bed, mid: str) -> Journal:
    return [j for j in all_journals(bed.host("host1").dir / "state") if j.id == mid][0]


def drive(mig, pid: int, env: dict[str, str] | None = None) -> tuple[int, dict]:
    r = mig("host1", DRIVER, pid, "host2", env=env)
    try:
        return r.returncode, json.loads(r.stdout)
    except ValueError:
        raise AssertionError(f"driver exited {r.returncode}: {r.stderr.decode()[-2000:]}") from None


def test_counter_moves_with_lazy_pages(mig, bed, counter):
    pid, out = counter()
    rc, res = drive(mig, pid)
    assert rc == 0, res
    before = len(read_counts(out))
    wait_for(lambda: len(read_counts(out)) >= before + 5, what="counter to go on")
    got = read_counts(out)
    assert got == list(range(1, len(got) + 1))
    assert copies(str(out)) == [res["target_pid"]]
    data = journal(bed, res["id"]).merged()
    assert data["last_page"] >= data["resumed"] - 1
    assert data["pushed_bytes"] + data["on_demand_bytes"] > 0
    assert not (bed.host("host2").dir / "state" / "incoming" / res["id"]).exists()


# --- `migrctl migrate --strategy postcopy` (the PostCopy strategy on the driver) -------------

#: Rewrites its memory all the time: every page of argv[2] MiB holds the round number; each
#: round checks every page still holds the previous one (a page lost or zero-filled by a move
#: shows as BAD) and appends the round to argv[1].
REWRITER = f"""
import sys, time  # {MARK}
path, mib = sys.argv[1], int(sys.argv[2])
buf = bytearray(mib << 20)
rnd, deadline = 0, time.time() + 600
while time.time() < deadline:
    bad = any(buf[i] != rnd % 256 for i in range(0, len(buf), 4096))
    rnd += 1
    for i in range(0, len(buf), 4096):
        buf[i] = rnd % 256
    with open(path, "a") as f:
        f.write(("BAD" if bad else str(rnd)) + "\\n")
    time.sleep(0.02)
"""


def run_workload(mig, out: Path, *argv: str) -> int:
    r = mig("host1", "-m", "migrd.cli", "run", "--json", "--name", f"w{int(time.time() * 1000) % 10**8}",
            "--", *argv)
    assert r.returncode == 0, r.stderr.decode()
    return json.loads(r.stdout)["pid"]


def migrate(mig, pid: int, env: dict[str, str] | None = None):
    return mig("host1", "-m", "migrd.cli", "migrate", "--json", pid, "--to", "host2", "--strategy", "postcopy",
               env=env, timeout=180)


def lines(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except FileNotFoundError:
        return []


def test_strategy_moves_counter_and_records_pages(mig, bed, counter):
    pid, out = counter()
    r = migrate(mig, pid)
    assert r.returncode == 0, r.stderr.decode()
    res = json.loads(r.stdout)
    assert res["strategy"] == "postcopy"
    before = len(read_counts(out))
    wait_for(lambda: len(read_counts(out)) >= before + 5, what="counter to go on")
    got = read_counts(out)
    assert got == list(range(1, len(got) + 1))
    assert copies(str(out)) == [res["target_pid"]]
    data = journal(bed, res["id"]).merged()
    assert {"resumed", "last_page", "on_demand_bytes", "pushed_bytes"} <= set(data)
    assert journal(bed, res["id"]).last_state() == "done"


def test_tcp_server_keeps_its_state(mig, run_in, tmp_path):
    portfile = tmp_path / "port"
    pid = run_workload(mig, portfile, PY, "-c", SERVER, str(portfile))
    try:
        wait_for(portfile.exists, what="server to listen")
        port = int(portfile.read_text())
        ask_cmd = ["-c", f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); "
                         f"from workloads import ask; print(ask({port}))"]
        assert [int(mig("host1", *ask_cmd).stdout) for _ in range(3)] == [1, 2, 3]
        r = migrate(mig, pid)
        assert r.returncode == 0, r.stderr.decode()
        assert int(mig("host2", *ask_cmd).stdout) == 4
    finally:
        end_copies(str(portfile))


def test_memory_rewritten_during_the_move_arrives_intact(mig, tmp_path):
    out = tmp_path / "rounds"
    pid = run_workload(mig, out, PY, "-c", REWRITER, str(out), "64")
    try:
        wait_for(lambda: len(lines(out)) >= 3, what="rewriter to start")
        r = migrate(mig, pid)
        assert r.returncode == 0, r.stderr.decode()
        n = len(lines(out))
        wait_for(lambda: len(lines(out)) >= n + 5, what="rewriter to go on")
        got = lines(out)
        assert "BAD" not in got and got == [str(i) for i in range(1, len(got) + 1)]
        assert len(copies(str(out))) == 1
    finally:
        end_copies(str(out))


@pytest.mark.parametrize("point", ["checkpoint", "transfer", "restore", "verify", "commit"])
def test_failure_before_the_switch_resumes_the_source(mig, bed, counter, point):
    pid, out = counter()
    r = migrate(mig, pid, env={"MIGRD_FAILPOINTS": f"{point}:error"})
    assert r.returncode == 1 and f"failpoint {point}:error".encode() in r.stderr, r.stderr
    wait_for(lambda: copies(str(out)) == [pid], what="only the source")
    n = len(read_counts(out))
    wait_for(lambda: len(read_counts(out)) >= n + 3, what="source to go on")
    incoming = bed.host("host2").dir / "state" / "incoming"
    assert not incoming.exists() or list(incoming.iterdir()) == []


def _criu_of(mid: str, action: str) -> int | None:
    for p in psutil.process_iter(["cmdline"]):
        argv = p.info["cmdline"] or []
        if action in argv and any(mid in a for a in argv):
            return p.pid
    return None


@pytest.mark.parametrize("who", ["lazy-pages"])
def test_page_server_killed_after_the_switch_is_reported_never_two_copies(mig, bed, run_in, tmp_path, who):
    """After the resume there, the copy needs the source's CRIU until the last page: killing
    it (or the target's lazy-pages daemon) loses the workload, and says so; the copy there is
    ended rather than left on missing memory, and the source was ended at the switch."""
    out = tmp_path / "rounds"
    pid = run_workload(mig, out, PY, "-c", REWRITER, str(out), "256")
    try:
        wait_for(lambda: len(lines(out)) >= 2, timeout=60, what="rewriter to start")
        # Every piece of page traffic held a while: pages are certainly still to come.
        proc = bed_spawn(bed, ["env", "MIGRD_FAILPOINTS=relay:delay", PY, "-m", "migrd.cli", "migrate", "--json",
                               str(pid), "--to", "host2", "--strategy", "postcopy"])
        state = bed.host("host1").dir / "state"
        # This workload's migration: the module's bed keeps the journals of earlier moves.
        j = wait_for(lambda: next((j for j in all_journals(state) if "resumed" in j.merged()
                                   and j.merged()["request"]["pid"] == pid), None),
                     timeout=60, what="the switch")
        victim = wait_for(lambda: _criu_of(j.id, who), what=f"criu {who}")
        os.kill(victim, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 13, err
        assert b"lost" in err
        assert j.last_state() == "lost"
        wait_for(lambda: copies(str(out)) == [], timeout=30, what="no copy anywhere")
        assert run_in("host2", "find", "/var/lib/migrd/incoming", "-mindepth", "1").stdout == b""
    finally:
        end_copies(str(out))


def test_migrd_killed_after_the_switch_never_leaves_two_copies(mig, bed, run_in, tmp_path):
    """migrd itself relays the pages: killed right after the copy there resumed, either every
    page had arrived (the copy runs on) or the target ends its copy (no page source is left).
    `migrctl recover` then says which, and nothing of the migration is left on the target."""
    out = tmp_path / "rounds"
    pid = run_workload(mig, out, PY, "-c", REWRITER, str(out), "64")
    try:
        wait_for(lambda: len(lines(out)) >= 2, timeout=60, what="rewriter to start")
        r = migrate(mig, pid, env={"MIGRD_FAILPOINTS": "resumed:die"})
        assert r.returncode in (-9, 137), r.stderr
        state = bed.host("host1").dir / "state"
        j = next(j for j in all_journals(state) if j.merged()["request"]["pid"] == pid)
        assert j.last_state() == "resumed"
        deadline = time.monotonic() + 60
        while True:
            recovered = mig("host1", "-m", "migrd.cli", "recover", "--json")
            report = [x for x in json.loads(recovered.stdout) if x["id"] == j.id]
            if report and not report[0]["action"].startswith("skipped") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        action = report[0]["action"]
        running = copies(str(out))
        assert len(running) <= 1
        if action.startswith("lost"):
            assert running == [] and j.last_state() == "lost"
        else:
            assert action == "committed" and len(running) == 1 and j.last_state() == "done", action
        left = run_in("host2", "find", "/var/lib/migrd/incoming", "-mindepth", "1").stdout
        assert left == b"", (action, left)
    finally:
        end_copies(str(out))
