"""Checkpoint and restore real processes with real CRIU on this host."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
