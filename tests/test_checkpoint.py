"""Checkpoint and restore real processes with real CRIU on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from workloads import COUNTER, SERVER, ask, end_copies, is_running, not_private, values, wait_for

pytestmark = pytest.mark.root

MIGRCTL = [sys.executable, "-m", "migrd.cli"]


def migrctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MIGRCTL, *map(str, args)], capture_output=True, text=True, timeout=120)


def checkpoint(pid: int, images: Path, *extra: str) -> dict:
    r = migrctl("checkpoint", pid, "--images", images, "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def restore(images: Path) -> int:
    r = migrctl("restore", images, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["pid"]


def assert_resumes(out: Path, before: list[int], min_new: int = 5) -> None:
    """The file holds one unbroken run 1..N: the restored process went on from the dumped
    value instead of starting again at 1."""
    wait_for(lambda: len(values(out)) >= len(before) + min_new, what=f"new values in {out}")
    got = values(out)
    assert got == list(range(1, len(got) + 1)), f"count did not continue: {got[len(before)-3:len(before)+5]}"


@pytest.mark.parametrize("session_leader", [True, False], ids=["setsid", "shell-job"])
def test_counter_continues_from_dumped_value(procs, migrd_config, tmp_path, session_leader):
    out = tmp_path / "count"
    if session_leader:
        p = procs.start(COUNTER, str(out))
        pid = p.pid
    else:
        pid = procs.start_job(COUNTER, str(out))
    wait_for(lambda: len(values(out)) >= 10, what="counter to start")
    info = checkpoint(pid, tmp_path / "img")
    if session_leader:
        procs.reap(p)
    before = values(out)
    assert info["files"] > 0 and info["image_bytes"] > 0
    assert restore(tmp_path / "img") == pid  # the shell job's zombie is its shell's to reap
    assert_resumes(out, before)


def test_process_with_child(procs, migrd_config, tmp_path):
    out = tmp_path / "count"
    p = procs.start(COUNTER, str(out), "child")
    child_out = Path(str(out) + ".child")
    wait_for(lambda: len(values(child_out)) >= 10, what="child to count")
    procs.adopt(p.pid)
    children = [pid for pid in procs.pids if pid != p.pid]
    checkpoint(p.pid, tmp_path / "img")
    procs.reap(p)
    before, child_before = values(out), values(child_out)
    restore(tmp_path / "img")
    assert_resumes(out, before)
    assert_resumes(child_out, child_before)
    assert children and all(is_running(c) for c in children)


def test_setsid_daemon_with_stdio_in_files(procs, migrd_config, tmp_path):
    """A double-forked daemon (not our child) with stdout and stderr appended to files."""
    out, log = tmp_path / "count", tmp_path / "daemon.log"
    pidfile = tmp_path / "daemon.pid"
    launcher = subprocess.run(
        ["sh", "-c", 'setsid "$0" -c "$1" "$2" </dev/null >>"$3" 2>&1 & echo $! > "$4"',
         sys.executable, COUNTER, str(out), str(log), str(pidfile)], timeout=10)
    assert launcher.returncode == 0
    pid = int(wait_for(lambda: pidfile.read_text().strip(), what="daemon pid"))
    procs.adopt(pid)
    wait_for(lambda: len(values(out)) >= 10, what="daemon to count")
    checkpoint(pid, tmp_path / "img")
    before = values(out)
    assert restore(tmp_path / "img") == pid  # waits for PID 1 to reap the old zombie
    assert_resumes(out, before)


def test_tcp_server_answers_after_restore_with_its_state(procs, migrd_config, tmp_path):
    portfile = tmp_path / "port"
    p = procs.start(SERVER, str(portfile))
    port = int(wait_for(lambda: portfile.exists() and portfile.read_text(), what="server port"))
    assert [ask(port) for _ in range(3)] == [1, 2, 3]
    info = checkpoint(p.pid, tmp_path / "img")
    procs.reap(p)
    manifest = json.loads((tmp_path / "img" / "manifest.json").read_text())
    assert {"family": "inet", "address": "127.0.0.1", "port": port} in manifest["process"]["listening"]
    assert info["pid"] == p.pid
    restore(tmp_path / "img")
    assert ask(port) == 4


def test_leave_running_then_restore_after_source_exits(procs, migrd_config, tmp_path):
    out = tmp_path / "count"
    p = procs.start(COUNTER, str(out))
    wait_for(lambda: len(values(out)) >= 10, what="counter to start")
    checkpoint(p.pid, tmp_path / "img", "--leave-running")
    at_dump = len(values(out))
    # The source keeps counting after the dump...
    wait_for(lambda: len(values(out)) >= at_dump + 10, what="source to keep counting")
    assert is_running(p.pid)
    p.kill()
    procs.reap(p)
    at_exit = len(values(out))
    restore(tmp_path / "img")
    wait_for(lambda: len(values(out)) > at_exit, what="restored counter")
    # ...and the restored copy goes on from the dumped value, not from where the source ended.
    first_new = values(out)[at_exit]
    assert 1 < first_new <= at_dump + 1


def test_restore_names_the_process_holding_the_pid(procs, migrd_config, tmp_path):
    from migrd.engine import checkpoint as cp
    from migrd import config
    from migrd.errors import NotPermitted

    out = tmp_path / "count"
    p = procs.start(COUNTER, str(out))
    wait_for(lambda: values(out), what="counter to start")
    checkpoint(p.pid, tmp_path / "img")
    # Not reaped yet: our zombie still holds the PID.
    with pytest.raises(NotPermitted, match=rf"PID {p.pid} .*zombie"):
        cp.restore(config.load(), tmp_path / "img", pid_wait=0.5)
    procs.reap(p)
    assert restore(tmp_path / "img") == p.pid


def migrctl_umask_022(*args: str) -> subprocess.CompletedProcess[str]:
    """migrctl as from a root shell or an sshd session, whose umask 022 made everything
    0755/0644 before."""
    return subprocess.run([*MIGRCTL, *map(str, args)], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: os.umask(0o022))


def test_images_and_state_are_root_only_whatever_the_umask(migrd_config, tmp_path):
    """A page image held an environment secret in clear text and manifest.json the whole
    environment: after run, checkpoint and restore under umask 022, every directory migrd or
    CRIU made (images, logs, workload registry and its output log) is 0700, every file 0600."""
    out = tmp_path / "count"
    state = tmp_path / "state"
    try:
        r = migrctl_umask_022("run", "--name", "perm", "--json", "--", sys.executable, "-c", COUNTER, out)
        assert r.returncode == 0, r.stderr
        pid = json.loads(r.stdout)["pid"]
        wait_for(lambda: len(values(out)) >= 5, what="counter to start")
        r = migrctl_umask_022("checkpoint", pid, "--images", tmp_path / "img", "--json")
        assert r.returncode == 0, r.stderr
        images = tmp_path / "img"
        assert any(images.glob("pages-*.img")) and (images / "manifest.json").exists()
        assert not_private(images) == {}
        r = migrctl_umask_022("restore", images, "--json")
        assert r.returncode == 0, r.stderr
        before = values(out)
        assert_resumes(out, before)
        assert {p.name for p in state.iterdir()} >= {"logs", "workloads"}
        assert not_private(state) == {}
        assert not_private(images) == {}
    finally:
        end_copies(str(out))


@pytest.fixture
def pidns_counters(migrd_config, tmp_path):
    """Counters started as `migrctl run` starts them (own PID namespace, the host's /proc), but
    in a working directory of the test's own, where CRIU's parasite makes its proc.crtools:
    never `/`, which other dumps on this machine use."""
    from migrd.adapters import workloads as wl

    home = tmp_path / "home"
    home.mkdir()
    outs: list[Path] = []

    def start() -> tuple[int, Path]:
        out = tmp_path / f"count-{len(outs)}"
        outs.append(out)
        w = wl.start(tmp_path / "state", (sys.executable, "-c", COUNTER, str(out)),
                     name=f"pidns{len(outs)}", cwd=str(home))
        wait_for(lambda: len(values(out)) >= 5, what="counter to start")
        return w.pid, out

    yield home, start
    end_copies(*map(str, outs))


def test_stale_proc_crtools_left_by_a_killed_dump_is_removed_and_the_dump_works(pidns_counters, tmp_path):
    """An empty proc.crtools in the workload's working directory (what a dump killed inside
    CRIU's parasite leaves) failed every later dump with "Can't create a directory (-17)"."""
    home, start = pidns_counters
    pid, out = start()
    (home / "proc.crtools").mkdir()
    info = checkpoint(pid, tmp_path / "img")
    assert info["files"] > 0
    assert not (home / "proc.crtools").exists()
    wait_for(lambda: not is_running(pid), what="the dumped workload to end")
    before = values(out)
    restore(tmp_path / "img")
    assert_resumes(out, before)


def test_proc_crtools_with_content_is_left_alone(pidns_counters, tmp_path):
    home, start = pidns_counters
    pid, _ = start()
    (home / "proc.crtools").mkdir()
    (home / "proc.crtools" / "someones").write_text("data")
    r = migrctl("checkpoint", pid, "--images", tmp_path / "img", "--leave-running")
    assert r.returncode == 5, r.stderr
    assert any("Can't create a directory (-17)" in log.read_text() for log in (tmp_path / "state" / "logs").glob("dump-*"))
    assert (home / "proc.crtools" / "someones").read_text() == "data" and is_running(pid)


def test_dumps_wait_for_each_other_one_at_a_time(pidns_counters, migrd_config, tmp_path):
    """Two workloads sharing a working directory: a dump waits while another holds the dump
    lock (and says so), is refused after criu.dump_lock_timeout with nothing frozen, and two
    dumps started together both succeed."""
    from migrd.adapters import dumplock

    home, start = pidns_counters
    (a, out_a), (b, _) = start(), start()
    lock = dumplock.acquire(5)
    try:
        waiting = subprocess.Popen([*MIGRCTL, "checkpoint", str(a), "--images", str(tmp_path / "wait"),
                                    "--leave-running", "--json"], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        time.sleep(2.0)
        assert waiting.poll() is None and not (tmp_path / "wait" / "inventory.img").exists()
        at = len(values(out_a))
        wait_for(lambda: len(values(out_a)) > at, what="the waiting dump's workload to keep counting")
    finally:
        os.close(lock.fd)
    out, err = waiting.communicate(timeout=120)
    assert waiting.returncode == 0, err
    assert "waited" in err and json.loads(out)["files"] > 0

    lock = dumplock.acquire(5)
    plain = migrd_config.read_text()
    try:
        with migrd_config.open("a") as f:
            f.write("criu:\n  dump_lock_timeout: 0.5\n")
        r = migrctl("checkpoint", b, "--images", tmp_path / "refused", "--leave-running")
    finally:
        os.close(lock.fd)
        # The two dumps below wait for each other (and, on a shared machine, for other runs'
        # dumps): with 0.5 s the second was refused whenever the first took longer.
        migrd_config.write_text(plain)
    assert r.returncode == 14 and "another CRIU dump" in r.stderr and "\n" not in r.stderr.strip(), r.stderr
    assert not (tmp_path / "refused").exists() and psutil.Process(b).status() != psutil.STATUS_STOPPED

    both = [subprocess.Popen([*MIGRCTL, "checkpoint", str(pid), "--images", str(tmp_path / f"both{pid}"),
                              "--leave-running"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for pid in (a, b)]
    for p in both:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    assert not (home / "proc.crtools").exists()
