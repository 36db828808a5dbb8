"""Migrations between bed hosts: real namespaces, real sshd, real CRIU.

The bed's hosts share one PID space, so "exactly one live copy" is counted directly: every
process on the machine whose command line names the test's unique output file.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from migrd.adapters import cgroup
from migrd import config as config_mod
from migrd.engine.journal import STEPS, Journal, all_journals, summarize
from migrbed.programs import COUNTER, read_counts
from workloads import CLIENT, RUN_TOKEN, copies, criu_tables, end_copies, marker, not_private, wait_for

pytestmark = pytest.mark.root
BED_HOSTS = 3
PY = sys.executable


@pytest.fixture(scope="module")
def mig(run_in):
    def call(host: str, *args: str, check: bool = True, env: dict[str, str] | None = None,
             timeout: float = 120):
        prefix = ["env", *(f"{k}={v}" for k, v in env.items())] if env else []
        r = run_in(host, *prefix, PY, "-m", "migrd.cli", *map(str, args), check=False, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"migrctl {' '.join(map(str, args))} on {host} exited "
                                 f"{r.returncode}: {r.stderr.decode()}")
        return r

    return call


def jrun(mig, host: str, command: str, *args: str, **kw) -> dict | list:
    return json.loads(mig(host, command, "--json", *args, **kw).stdout)


@pytest.fixture
def counter(mig, tmp_path):
    """Start a counter workload with `migrctl run` on host1; end every copy afterwards."""
    started: list[Path] = []

    def start(host: str = "host1", name: str | None = None) -> tuple[int, Path]:
        out = tmp_path / f"count-{len(started)}"
        started.append(out)
        name = name or f"c{int(time.time() * 1000) % 10**8}"
        info = jrun(mig, host, "run", "--name", name, "--", PY, "-c", COUNTER, str(out))
        wait_for(lambda: len(read_counts(out)) >= 5, what="counter to start")
        return info["pid"], out

    yield start
    end_copies(*map(str, started))


def continues(out: Path, n_new: int = 5) -> list[int]:
    before = len(read_counts(out))
    wait_for(lambda: len(read_counts(out)) >= before + n_new, what=f"{out.name} to keep counting")
    got = read_counts(out)
    assert got == list(range(1, len(got) + 1)), f"count went backwards or restarted: {got[-30:]}"
    return got


def test_move_counter_continues(mig, counter, bed):
    pid, out = counter()
    res = jrun(mig, "host1", "migrate", pid, "--to", "host2")
    # The journal (command line, environment) and the received images are root's alone on
    # both hosts, whatever the umask of the SSH session that made them.
    src, dst = (bed.host(h).dir / "state" for h in ("host1", "host2"))
    assert (src / "migrations").is_dir() and (dst / "incoming").is_dir()
    assert not_private(src) == {} and not_private(dst) == {}
    assert res["target"] == "host2" and res["downtime"] > 0 and res["bytes"] > 0
    continues(out)
    assert copies(str(out)) == [res["target_pid"]]
    on2 = jrun(mig, "host2", "ps")
    assert [w["pid"] for w in on2 if w["alive"]] == [res["target_pid"]]
    assert not [w for w in jrun(mig, "host1", "ps") if w["alive"]]
    hist = jrun(mig, "host1", "history")
    assert hist[-1]["outcome"] == "ok" and set(hist[-1]["phases"]) >= {"checkpoint", "transfer", "restore"}


def test_dry_run_checks_everything_and_changes_nothing(mig, counter):
    pid, out = counter()
    res = jrun(mig, "host1", "migrate", pid, "--to", "host2", "--dry-run")
    assert res["dry_run"] and res["target_pid"] is None
    assert copies(str(out)) == [pid]
    continues(out, 3)
    assert jrun(mig, "host1", "history")[-1]["outcome"] == "dry run"


def test_twenty_ping_pong_moves(mig, counter):
    pid, out = counter()
    here, there = "host1", "host2"
    for _ in range(20):
        res = jrun(mig, here, "migrate", pid, "--to", there)
        pid = res["target_pid"]
        assert copies(str(out)) == [pid]
        here, there = there, here
    continues(out)


def test_not_opted_in_and_bad_input_change_nothing(mig, run_in, tmp_path, counter):
    out = tmp_path / "plain"
    r = run_in("host1", "sh", "-c", 'setsid "$0" -c "$1" "$2" </dev/null >/dev/null 2>&1 & echo $!',
               PY, COUNTER, str(out))
    plain = int(r.stdout)
    try:
        wait_for(lambda: read_counts(out), what="plain process")
        refused = mig("host1", "migrate", plain, "--to", "host2", check=False)
        assert refused.returncode == 4 and b"not opted in" in refused.stderr
        pid, wout = counter()
        unknown = mig("host1", "migrate", pid, "--to", "host9", check=False)
        assert unknown.returncode == 3 and b"unknown host 'host9'" in unknown.stderr
        dead = mig("host1", "migrate", 4_000_000, "--to", "host2", check=False)
        assert dead.returncode == 3 and b"no process with PID" in dead.stderr
        for o in (out, wout):
            continues(o, 3)
            assert len(copies(str(o))) == 1
    finally:
        psutil.Process(plain).kill()


def test_pids_held_on_the_target_are_refused_by_precheck(mig, run_in, bed, tmp_path):
    """A process outside its own PID namespace needs its PIDs there. The bed's hosts share one
    PID space, so a clone finds them held by the source itself and is refused; a move is not,
    since the dump frees them (the target tells the very process by its start time)."""
    out = tmp_path / "plain"
    etc = bed.host("host1").dir / "etc"
    cfg = config_mod.parse((etc / "migrd.yaml").read_text())
    cfg = dataclasses.replace(cfg, migrate=dataclasses.replace(cfg.migrate, allow_commands=(str(out) + "$",)))
    (etc / "allow-plain.yaml").write_text(config_mod.dump(cfg))
    env = {"MIGRD_CONFIG": "/etc/migrd/allow-plain.yaml"}
    r = run_in("host1", "sh", "-c", 'setsid "$0" -c "$1" "$2" </dev/null >/dev/null 2>&1 & echo $!',
               PY, COUNTER, str(out))
    plain = int(r.stdout)
    try:
        wait_for(lambda: read_counts(out), what="plain process")
        clone = mig("host1", "migrate", plain, "--to", "host2", "--mode", "clone", "--dry-run", check=False, env=env)
        assert clone.returncode == 10 and f"PID {plain} is taken on the target by ".encode() in clone.stderr, \
            clone.stderr
        moved = jrun(mig, "host1", "migrate", plain, "--to", "host2", "--dry-run", env=env)
        assert moved["dry_run"]
        continues(out, 3)
        assert copies(str(out)) == [plain]
    finally:
        psutil.Process(plain).kill()


def test_clone_leaves_two_copies_both_counting(mig, counter):
    """Both copies run on after a clone: neither is left stopped, and both count. They append
    to the same file from the dumped value on, so two running copies write every new value
    twice (a copy left stopped, which `copies` still finds, would write nothing)."""
    pid, out = counter()
    res = jrun(mig, "host1", "migrate", pid, "--to", "host2", "--mode", "clone")
    assert sorted(copies(str(out))) == sorted([pid, res["target_pid"]])
    before = len(read_counts(out))
    time.sleep(1.0)
    for _ in range(2):  # two readings, a second apart: both copies keep going
        seen = len(read_counts(out))
        wait_for(lambda: sum(n == 2 for n in collections.Counter(read_counts(out)[seen:]).values()) >= 5,
                 what="both copies to write each new value")
        assert all(psutil.Process(p).status() != psutil.STATUS_STOPPED for p in (pid, res["target_pid"]))
    counts = collections.Counter(read_counts(out)[before:])
    assert set(counts.values()) <= {1, 2}, "a copy went backwards or a third copy counts"


def test_restart_starts_fresh_on_target(mig, counter, tmp_path):
    pid, out = counter()
    res = jrun(mig, "host1", "migrate", pid, "--to", "host2", "--mode", "restart")
    assert copies(str(out)) == [res["target_pid"]]
    wait_for(lambda: read_counts(out).count(1) == 2 and read_counts(out)[-1] >= 3, what="restarted counter")
    # The source ended before the fresh start, which counts from 1 again (weak mobility:
    # code and data move, execution state does not).
    vals = read_counts(out)
    k = vals.index(1, 1)
    assert vals == list(range(1, k + 1)) + list(range(1, len(vals) - k + 1))


DATA_READER = """
import sys, time  # migrd-workload
f = open(sys.argv[1])            # held open: CRIU needs it on the target
data = f.read()
n = 0
while n < 36000:
    n += 1
    with open(sys.argv[2], "a") as o:
        o.write(f"{n}\\n")
    time.sleep(0.05)
"""


def test_with_files_carries_open_data_file(mig, run_in, tmp_path):
    out = tmp_path / "reader"
    data = "/srv/migrd/data-" + tmp_path.name
    run_in("host1", "sh", "-c", 'echo precious > "$0"', data)
    assert run_in("host2", "test", "-e", data, check=False).returncode != 0  # private per host
    w = jrun(mig, "host1", "run", "--name", "reader-" + tmp_path.name[-6:], "--", PY, "-c", DATA_READER, data, str(out))
    try:
        wait_for(lambda: read_counts(out), what="reader")
        r = mig("host1", "migrate", w["pid"], "--to", "host2", check=False)
        assert r.returncode == 10 and data.encode() in r.stderr and b"--with-files" in r.stderr
        res = jrun(mig, "host1", "migrate", w["pid"], "--to", "host2", "--with-files")
        assert run_in("host2", "cat", data).stdout == b"precious\n"
        continues(out, 3)
        assert copies(str(out)) == [res["target_pid"]]
    finally:
        end_copies(str(out))


#: Keeps one file open for writing (not append) and grows it every 20 ms: a log on storage both
#: hosts share. CRIU checks such a file's size on restore; only the freeze stops its growth.
GROWER = """
import sys, time  # migrd-workload
f = open(sys.argv[1], "w")
n, deadline = 0, time.time() + 3600
while time.time() < deadline:
    n += 1
    f.write(f"{n}\\n")
    f.flush()
    time.sleep(0.02)
"""


def test_growing_file_on_shared_storage_moves_and_is_never_copied_onto_itself(mig, bed, tmp_path):
    """The bed's hosts share /tmp: the file the source saw at its size is there, bigger. The
    precheck recognises it (filesystem, inode, the bytes read here) and leaves the size to
    CRIU after the freeze; --with-files does not copy it onto itself (which would empty it)."""
    out = tmp_path / "grows.log"
    w = jrun(mig, "host1", "run", "--name", "grow-" + tmp_path.name[-6:], "--", PY, "-c", GROWER, str(out))
    try:
        wait_for(lambda: len(read_counts(out)) >= 20, what="grower")
        res = jrun(mig, "host1", "migrate", w["pid"], "--to", "host2")
        continues(out, 20)
        assert copies(str(out)) == [res["target_pid"]]
        back = jrun(mig, "host2", "migrate", res["target_pid"], "--to", "host1", "--with-files")
        continues(out, 20)
        assert copies(str(out)) == [back["target_pid"]]
        journal = all_journals(bed.host("host2").dir / "state")[-1].merged()
        assert journal["options"]["with_files"] and str(out) not in journal["carry"]
    finally:
        end_copies(str(out))


#: A service's two processes sharing memory: the worker counts in an anonymous shared page,
#: the main process appends "uid count" from that page to argv[1] every 50 ms.
SHARED_PAGE = """
import mmap, os, struct, sys, time  # migrd-workload
page = mmap.mmap(-1, 4096, flags=mmap.MAP_SHARED)
deadline = time.time() + 3600
if os.fork() == 0:
    while time.time() < deadline:
        struct.pack_into("q", page, 0, struct.unpack_from("q", page, 0)[0] + 1)
        time.sleep(0.01)
    sys.exit()
while time.time() < deadline:
    with open(sys.argv[1], "a") as f:
        f.write(f"{os.getuid()} {struct.unpack_from('q', page, 0)[0]}\\n")
    time.sleep(0.05)
"""


def service_lines(out: Path) -> list[tuple[int, int]]:
    try:
        return [(int(u), int(n)) for u, n in (ln.split() for ln in out.read_text().splitlines())]
    except FileNotFoundError:
        return []


@pytest.fixture
def service_dir():
    """A directory the service user can write to (the test's own temp dir is root's alone)."""
    import shutil
    import tempfile

    # Not under tmp_path, whose parents nobody cannot enter; the token makes it this run's marker.
    d = Path(tempfile.mkdtemp(prefix=f"migrd-svc-{RUN_TOKEN}-"))
    os.chown(d, 65534, 65534)
    yield d
    end_copies(str(d))
    shutil.rmtree(d)


def test_service_running_as_unprivileged_user_moves_with_its_shared_memory(mig, service_dir):
    """`migrctl run --user nobody`: two processes sharing a page, neither root, move to host2
    and go on counting from where they were."""
    out = service_dir / "svc.log"
    w = jrun(mig, "host1", "run", "--user", "nobody", "--name", "svc-" + service_dir.name[-6:], "--",
             "/usr/bin/python3", "-c", SHARED_PAGE, str(out))
    wait_for(lambda: len(service_lines(out)) >= 5 and service_lines(out)[-1][1] > 20, what="service")
    assert len(copies(str(out))) == 2 and {psutil.Process(p).uids().real for p in copies(str(out))} == {65534}
    res = jrun(mig, "host1", "migrate", w["pid"], "--to", "host2")
    before = service_lines(out)
    wait_for(lambda: len(service_lines(out)) >= len(before) + 5, what="service to go on")
    after = service_lines(out)[len(before):]
    assert {u for u, _ in after} == {65534}
    # The count in the shared page went on from the dumped value: never back to 0.
    counts = [n for _, n in service_lines(out)]
    assert counts == sorted(counts) and after[0][1] >= before[-1][1] > 20
    moved = copies(str(out))
    assert res["target_pid"] in moved and len(moved) == 2


def test_restart_of_a_service_runs_it_as_its_user_there(mig, service_dir):
    """--mode restart starts the command fresh on the target as the user it ran as, never as
    root."""
    out = service_dir / "restarted.log"
    w = jrun(mig, "host1", "run", "--user", "nobody", "--name", "rs-" + service_dir.name[-6:], "--",
             "/usr/bin/python3", "-c", SHARED_PAGE, str(out))
    wait_for(lambda: len(service_lines(out)) >= 3, what="service")
    before = len(service_lines(out))
    res = jrun(mig, "host1", "migrate", w["pid"], "--to", "host2", "--mode", "restart")
    wait_for(lambda: len(service_lines(out)) >= before + 3, what="restarted service")
    assert {u for u, _ in service_lines(out)[before:]} == {65534}
    assert res["target_pid"] in copies(str(out)) and w["pid"] not in copies(str(out))
    assert {psutil.Process(p).uids().real for p in copies(str(out))} == {65534}


def test_service_dropping_its_rights_in_its_own_pid_namespace_is_refused_and_keeps_running(mig, service_dir,
                                                                                          staged_env):
    """Dropping the rights inside the command makes an unprivileged PID-namespace init, which
    CRIU cannot dump: refused with the way out, and the service runs on untouched. (Staged:
    the streamed path reports its page stream's end instead of the reason, for now.)"""
    out = service_dir / "self.log"
    w = jrun(mig, "host1", "run", "--name", "self-" + service_dir.name[-6:], "--", "setpriv", "--reuid=nobody",
             "--regid=nogroup", "--clear-groups", "--", "/usr/bin/python3", "-c", SHARED_PAGE, str(out))
    wait_for(lambda: len(service_lines(out)) >= 3, what="service")
    r = mig("host1", "migrate", w["pid"], "--to", "host2", check=False, env=staged_env)
    assert r.returncode != 0 and b"migrctl run --user" in r.stderr, r.stderr
    n = len(service_lines(out))
    wait_for(lambda: len(service_lines(out)) >= n + 3, what="service to keep running")
    assert w["pid"] in copies(str(out))


# --- crash safety ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def staged_env(bed) -> dict[str, str]:
    """Environment for a host1 migrctl that takes the staged path (`migrate.strategies: [stop-copy]`):
    the dump ends the source, and a rollback restores it from its own images."""
    etc = bed.host("host1").dir / "etc"
    cfg = config_mod.parse((etc / "migrd.yaml").read_text())
    cfg = dataclasses.replace(cfg, migrate=dataclasses.replace(cfg.migrate, strategies=("stop-copy",)))
    (etc / "staged.yaml").write_text(config_mod.dump(cfg))
    return {"MIGRD_CONFIG": "/etc/migrd/staged.yaml"}


def host_of(bed, pid: int) -> str | None:
    return next((h.name for h in bed.hosts if pid in cgroup.pids(h.cgroup)), None)


def journal_of(bed, pid: int) -> Journal:
    """The newest migration of pid started on host1."""
    return [j for j in all_journals(bed.host("host1").dir / "state")
            if j.merged().get("request", {}).get("pid") == pid][-1]


def leftovers(bed, mid: str) -> list[str]:
    """Images of migration mid still on disk: the source's staged images (or ones kept after a
    failed local restore), the target's received images and streamed pages."""
    paths = [bed.host("host1").dir / "state" / "migrations" / mid / d for d in ("images", "images.kept")]
    paths += [bed.host(h).dir / "state" / "incoming" / f"{mid}{sfx}"
              for h in ("host1", "host2") for sfx in ("", ".partial")]
    paths += [bed.host("host2").dir / "state" / "incoming" / mid / "images.partial"]
    return [str(p) for p in paths if p.exists()]


def recover_settled(mig, mid: str, timeout: float = 60) -> str:
    """Run `migrctl recover` on host1 until it acts on mid (a CRIU that outlived the killed
    orchestrator holds the migration's lock until it is done); return what it did."""
    deadline = time.monotonic() + timeout
    while True:
        acts = [r["action"] for r in jrun(mig, "host1", "recover") if r["id"] == mid]
        assert acts, f"recover found nothing to do for {mid} after a crash"
        if not acts[0].startswith("skipped") or time.monotonic() > deadline:
            return acts[0]
        time.sleep(0.5)


#: (failpoint, kind) -> (where the one copy runs afterwards, what `recover` reports). Every
#: step fails ("error") or the orchestrator dies right after journaling it ("die"); inside the
#: checkpoint it also dies while CRIU dumps ("dumping") and after CRIU but before the
#: manifest ("dumped"). Once the target copy was restored and verification began, recovery
#: rolls forward; before that it rolls back, and an error always rolls back at once.
FAILPOINTS = {
    **{(s, "error"): ("host1", None) for s in STEPS},
    ("precheck", "die"): ("host1", "nothing had changed"),
    ("checkpoint", "die"): ("host1", "rolled back"),
    ("dumping", "die"): ("host1", "rolled back"),
    ("dumped", "die"): ("host1", "rolled back"),
    ("transfer", "die"): ("host1", "rolled back"),
    ("restore", "die"): ("host1", "rolled back"),
    ("verify", "die"): ("host2", "rolled forward"),
    ("commit", "die"): ("host2", "committed"),
}


#: Both paths from the checkpoint on; before it they are the same code.
MATRIX = [pytest.param(point, kind, path, id=f"{point}-{kind}-{path}") for (point, kind) in FAILPOINTS
          for path in ("streamed", "staged") if point != "precheck" or path == "streamed"]


@pytest.mark.parametrize("point,kind,path", MATRIX)
def test_failpoints_leave_exactly_one_copy(mig, bed, run_in, counter, staged_env, point, kind, path):
    """Each failure or crash ends with one running copy on the expected host, recovery (after
    a crash) reporting the expected direction, the count unbroken, and no images and no
    network-lock table of CRIU's left (a crash between the dump and `transfer` used to leave
    the table for good)."""
    host, recovered = FAILPOINTS[point, kind]
    pid, out = counter()
    tables = criu_tables(run_in, "host1")
    env = {"MIGRD_FAILPOINTS": f"{point}:{kind}", **(staged_env if path == "staged" else {})}
    r = mig("host1", "migrate", pid, "--to", "host2", check=False, env=env)
    j = journal_of(bed, pid)
    if "checkpoint" in [rec.state for rec in j.records()]:
        assert j.merged()["strategy"] == ("stream-copy" if path == "streamed" else "stop-copy")
    if kind == "die":
        assert r.returncode in (-9, 137), r.stderr
        action = recover_settled(mig, j.id)
        assert action.startswith(recovered), action
    else:
        assert r.returncode == 1 and f"failpoint {point}:error".encode() in r.stderr, r.stderr
        outcome = "refused" if point == "precheck" else "rolled back"
        assert summarize(j).outcome == outcome
    wait_for(lambda: len(copies(str(out))) == 1, timeout=30, what="exactly one copy")
    [copy] = copies(str(out))
    assert host_of(bed, copy) == host
    continues(out, 3)
    assert copies(str(out)) == [copy] and psutil.Process(copy).status() != psutil.STATUS_STOPPED
    assert leftovers(bed, j.id) == []
    assert criu_tables(run_in, "host1") <= tables


def test_a_crash_after_the_precheck_still_cleans_what_the_target_began_to_receive(mig, bed, counter):
    """The target's receivers start right after the precheck, before the next journal record:
    an orchestrator killed in between (a chaos run's kill landed there) left the target's
    incoming directory behind while recovery said nothing had changed. Recovery now asks the
    target to drop it; the source never stopped."""
    pid, out = counter()
    r = mig("host1", "migrate", pid, "--to", "host2", check=False, env={"MIGRD_FAILPOINTS": "prechecked:die"})
    assert r.returncode in (-9, 137), r.stderr
    j = journal_of(bed, pid)
    assert j.last_state() == "prechecked"
    received = bed.host("host2").dir / "state" / "incoming" / j.id / "images"
    received.mkdir(parents=True)  # as far as the image receiver had got
    (received / "pages-1.img").write_bytes(b"\0" * 4096)
    assert recover_settled(mig, j.id) == "nothing had changed"
    assert j.last_state() == "rolled_back" and leftovers(bed, j.id) == []
    assert copies(str(out)) == [pid]
    continues(out, 3)


def test_streamed_move_resumes_the_source_itself_on_rollback(mig, counter):
    """A workload in its own PID namespace has its pages streamed during the dump and stays
    stopped, not ended: a failure after the dump resumes that very process (same PID and
    start time), where the staged path would restore a new one from images."""
    pid, out = counter()
    born = psutil.Process(pid).create_time()
    r = mig("host1", "migrate", pid, "--to", "host2", check=False,
            env={"MIGRD_FAILPOINTS": "restore:error"})
    assert r.returncode != 0 and b"failpoint restore:error" in r.stderr
    assert copies(str(out)) == [pid] and psutil.Process(pid).create_time() == born
    continues(out, 3)
    res = jrun(mig, "host1", "migrate", pid, "--to", "host2")
    assert res["streamed"] and res["bytes"] > psutil.Process(res["target_pid"]).memory_info().rss // 2
    continues(out)
    assert copies(str(out)) == [res["target_pid"]]


# --- full disks ------------------------------------------------------------------------------

@pytest.fixture
def small_fs(run_in):
    """Mount a tiny tmpfs over a directory inside one bed host (its private mount namespace:
    nothing changes outside it); unmounted afterwards, even on failure."""
    mounted: list[tuple[str, str]] = []

    def mount(host: str, path: str, size: str) -> None:
        run_in(host, "mkdir", "-p", path)
        run_in(host, "mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
        mounted.append((host, path))

    yield mount
    for host, path in mounted:
        run_in(host, "umount", "--lazy", path, check=False)


def test_full_incoming_directory_on_target_is_refused_by_precheck(mig, run_in, counter, small_fs):
    """The images and streamed pages land in the target's state_dir/incoming, which can be
    a filesystem of its own: the precheck measures that one (it measured state_dir's, let
    the move start and fail on ENOSPC) and refuses, naming it; nothing changed."""
    pid, out = counter()
    small_fs("host2", "/var/lib/migrd/incoming", "1m")
    r = mig("host1", "migrate", pid, "--to", "host2", check=False)
    err = r.stderr.decode()
    assert r.returncode == 10, err
    assert "target has 1 MiB free disk in /var/lib/migrd/incoming for images" in err, err
    assert copies(str(out)) == [pid]
    continues(out, 3)
    assert run_in("host2", "ls", "-A", "/var/lib/migrd/incoming").stdout == b""


FILL = """
import os, sys
st = os.statvfs(os.path.dirname(sys.argv[1]))
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY, 0o600)
os.posix_fallocate(fd, 0, st.f_bavail * st.f_frsize - int(sys.argv[2]))
"""


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "staged"])
def test_target_disk_filling_up_mid_migration_rolls_back(mig, bed, run_in, counter, small_fs, staged_env,
                                                         streamed):
    """The target's disk fills up after a precheck that saw room (held at the checkpoint, the
    test fills it but for 256 KiB): one readable line, a non-zero exit, and the workload
    runs on here exactly once."""
    from migrbed import bed as bed_mod

    pid, out = counter()
    small_fs("host2", "/var/lib/migrd/incoming", "64m")
    env = {"MIGRD_FAILPOINTS": "checkpoint:delay", **({} if streamed else staged_env)}
    p = bed_mod.spawn_in(bed, "host1", ["env", *(f"{k}={v}" for k, v in env.items()), PY, "-m", "migrd.cli",
                                        "migrate", str(pid), "--to", "host2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    filler = "/var/lib/migrd/incoming/filler"
    try:
        wait_for(lambda: any(j.last_state() == "checkpoint" and j.merged()["request"]["pid"] == pid
                             for j in all_journals(bed.host("host1").dir / "state")),
                 what="the migration to pass its precheck")
        run_in("host2", PY, "-c", FILL, filler, str(256 << 10))
        _, err_b = p.communicate(timeout=180)
    finally:
        if p.poll() is None:
            p.kill()
    err = err_b.decode()
    assert p.returncode not in (0, -9, 137) and "Traceback" not in err
    assert "No space left on device" in err and "Errno" not in err, err
    assert journal_of(bed, pid).merged()["strategy"] == ("stream-copy" if streamed else "stop-copy")
    if streamed:
        assert copies(str(out)) == [pid]  # resumed, not restored
    else:
        assert len(copies(str(out))) == 1
    continues(out, 3)
    run_in("host2", "rm", filler)
    assert run_in("host2", "ls", "-A", "/var/lib/migrd/incoming").stdout == b""


def test_full_disk_on_source_stops_only_the_staged_path(mig, counter, small_fs):
    """With 512 KiB free where the source keeps its images, a staged dump of the counter
    (~5 MiB of pages) fails cleanly and the counter runs on; a streamed one needs room only
    for the small images and goes through."""
    pid, out = counter()
    small_fs("host1", "/var/lib/migrd/migrations", "512k")
    r = mig("host1", "migrate", pid, "--to", "host2", "--tcp-established", check=False)
    err = r.stderr.decode()
    assert r.returncode == 5 and "Traceback" not in err and "No space left on device" in err, err
    assert len(copies(str(out))) == 1
    continues(out, 3)
    res = jrun(mig, "host1", "migrate", copies(str(out))[0], "--to", "host2")
    assert res["streamed"]
    continues(out)
    assert copies(str(out)) == [res["target_pid"]]


# --- moving a service address -----------------------------------------------------------------

SERVICE = """
import socket, sys, time  # migrd-workload
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 8080)); s.listen(8)
served, deadline, conns = 0, time.time() + 1800, []
import select
while time.time() < deadline:
    r, _, _ = select.select([s, *conns], [], [], 1)
    for x in r:
        if x is s:
            c, _ = s.accept(); conns.append(c)
            continue
        line = x.recv(64)
        if not line:
            conns.remove(x); x.close(); continue
        served += 1
        x.sendall(f"{served}\\n".encode())
"""

#: Passed after the address (SERVICE ignores it): this run's copies of the service.
SERVICE_MARK = marker("service")

def test_move_address_and_established_connection(mig, run_in, bed, tmp_path):
    from migrbed import bed as bed_mod

    vip = "198.18.0.100"
    name = "svc-" + tmp_path.name[-8:]
    run_in("host1", "ip", "addr", "add", f"{vip}/24", "dev", "eth0")
    w = jrun(mig, "host1", "run", "--name", name, "--", PY, "-c", SERVICE, vip, SERVICE_MARK)
    go = tmp_path / "go"
    client = None
    try:
        wait_for(lambda: run_in("host3", PY, "-c", CLIENT, vip, "1", "20", check=False).returncode == 0,
                 what="service up")
        client = bed_mod.spawn_in(bed, "host3", [PY, "-c", CLIENT, vip, "3", "20", str(go)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        first = eval(client.stdout.readline())
        tables_before = criu_tables(run_in, "host1")
        res = jrun(mig, "host1", "migrate", w["pid"], "--to", "host2", "--move-address", f"{vip}/24",
                   "--tcp-established")
        assert not res["streamed"]  # sockets in repair mode: the staged path, ended source
        # CRIU's network-lock table (inet CRIU-<id>) left by the dump is gone from the source.
        assert criu_tables(run_in, "host1") <= tables_before
        assert vip.encode() not in run_in("host1", "ip", "-o", "addr", "show").stdout
        assert vip.encode() in run_in("host2", "ip", "-o", "addr", "show").stdout
        # A new connection reaches the same server, with its state.
        fresh = eval(run_in("host3", PY, "-c", CLIENT, vip, "2", "20").stdout)
        assert fresh[0] > first[-1] and fresh[1] == fresh[0] + 1
        # The connection opened before the move still works.
        go.touch()
        out, err = client.communicate(timeout=60)
        held = eval(out.decode().strip().splitlines()[-1])
        assert client.returncode == 0, err
        assert held[:3] == first and len(held) == 6 and held == sorted(held)
        assert copies(SERVICE_MARK) == [res["target_pid"]]
    finally:
        if client and client.poll() is None:
            client.kill()
        for host in ("host1", "host2"):
            run_in(host, "ip", "addr", "del", f"{vip}/24", "dev", "eth0", check=False)
        end_copies(SERVICE_MARK)


def test_moved_address_is_announced(mig, run_in, tmp_path):
    """Without --tcp-established nothing the moved service sends tells host3 where its address
    went: only the gratuitous ARP does. host3 talked to it just before the move, so its ARP
    entry points at host1 and stays trusted for 15-45 s (base_reachable_time), then needs ~8 s
    of probing: without the announcement its next connection stalls well past the 5 s timeout
    here (~54 s measured)."""
    vip = "198.18.0.101"
    name = "ann-" + tmp_path.name[-8:]
    run_in("host1", "ip", "addr", "add", f"{vip}/24", "dev", "eth0")
    try:
        w = jrun(mig, "host1", "run", "--name", name, "--", PY, "-c", SERVICE, vip, SERVICE_MARK)
        wait_for(lambda: run_in("host3", PY, "-c", CLIENT, vip, "1", "5", check=False).returncode == 0,
                 what="service up")
        before = eval(run_in("host3", PY, "-c", CLIENT, vip, "1", "5").stdout)
        res = jrun(mig, "host1", "migrate", w["pid"], "--to", "host2", "--move-address", f"{vip}/24")
        assert res["announce_error"] is None  # arping ran and succeeded on host2
        after = eval(run_in("host3", PY, "-c", CLIENT, vip, "1", "5").stdout)
        assert after[0] > before[0]  # the same server, its state kept
        assert copies(SERVICE_MARK) == [res["target_pid"]]
    finally:
        for host in ("host1", "host2"):
            run_in(host, "ip", "addr", "del", f"{vip}/24", "dev", "eth0", check=False)
        end_copies(SERVICE_MARK)


# --- keep last: it stops host3's sshd --------------------------------------------------------

def test_target_down_is_refused_within_timeout(mig, run_in, bed, counter):
    """A host whose sshd is gone: precheck cannot reach it, nothing changes. Last in this
    module: host3's sshd stays down afterwards."""
    from migrbed import bed as bed_mod

    pid, out = counter()
    bed_mod.stop(bed.host("host3").sshd)
    t0 = time.monotonic()
    r = mig("host1", "migrate", pid, "--to", "host3", check=False)
    assert r.returncode == 7, r.stderr
    assert b"host3" in r.stderr and b"unreachable" in r.stderr
    assert time.monotonic() - t0 < 30
    continues(out, 3)
    assert len(copies(str(out))) == 1


def test_sigterm_mid_migration_rolls_back_at_the_next_step(mig, bed, counter):
    """SIGTERM never interrupts a step (a CRIU killed mid-dump could leave its frozen task
    broken): the migration stops at the next step boundary and rolls back."""
    import signal as sig

    from migrbed import bed as bed_mod

    pid, out = counter()
    p = bed_mod.spawn_in(bed, "host1", ["env", "MIGRD_FAILPOINTS=transfer:delay", PY, "-m", "migrd.cli",
                                        "migrate", str(pid), "--to", "host2"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    state = bed.host("host1").dir / "state"
    # This migration's own journal, held at transfer (a text search for the PID could match
    # a timestamp in an older journal and signal too early).
    wait_for(lambda: any(j.last_state() == "transfer" and j.merged()["request"]["pid"] == pid
                         for j in all_journals(state)), what="the migration to reach transfer")
    p.send_signal(sig.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 1 and b"interrupted (SIGTERM/SIGINT) before transfer" in err, err
    wait_for(lambda: len(copies(str(out))) == 1, what="exactly one copy")
    continues(out, 3)
    assert [m["outcome"] for m in jrun(mig, "host1", "history") if m["pid"] == pid][-1] == "rolled back"
