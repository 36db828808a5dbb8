"""Bad input and damaged images: one readable line, a documented exit code, nothing started."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from workloads import COUNTER, values, wait_for

pytestmark = pytest.mark.root

MIGRCTL = [sys.executable, "-m", "migrd.cli"]


def migrctl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*MIGRCTL, *map(str, args)], capture_output=True, text=True, timeout=120)


def assert_refused(r: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    assert r.returncode == code, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in r.stderr, r.stderr


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    """One real checkpoint (of a counter that is then gone), copied by tests that damage it."""
    from workloads import Procs

    tmp = tmp_path_factory.mktemp("image")
    procs = Procs(tmp)
    env_cfg = tmp / "migrd.yaml"
    env_cfg.write_text(f"state_dir: {tmp / 'state'}\n")
    try:
        p = procs.start(COUNTER, str(tmp / "count"))
        wait_for(lambda: len(values(tmp / "count")) >= 3, what="counter")
        r = subprocess.run([*MIGRCTL, "checkpoint", str(p.pid), "--images", str(tmp / "img")],
                           capture_output=True, text=True, timeout=60,
                           env={**os.environ, "MIGRD_CONFIG": str(env_cfg)})
        assert r.returncode == 0, r.stderr
        procs.reap(p)
        yield tmp / "img"
    finally:
        procs.cleanup()


def damaged_copy(image: Path, tmp_path: Path) -> Path:
    import shutil

    dst = tmp_path / "copy"
    shutil.copytree(image, dst)
    return dst


def pid_of(image: Path) -> int:
    return json.loads((image / "manifest.json").read_text())["process"]["pid"]


def test_flipped_byte_in_page_image_is_refused(image, tmp_path, migrd_config):
    d = damaged_copy(image, tmp_path)
    pages = max(d.glob("pages-*.img"), key=lambda p: p.stat().st_size)
    data = bytearray(pages.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pages.write_bytes(bytes(data))
    assert_refused(migrctl("restore", d), 6, pages.name, "altered")
    assert not psutil.pid_exists(pid_of(d))


def test_deleted_image_file_is_refused(image, tmp_path, migrd_config):
    d = damaged_copy(image, tmp_path)
    victim = sorted(d.glob("core-*.img"))[0]
    victim.unlink()
    assert_refused(migrctl("restore", d), 6, victim.name, "missing")
    assert not psutil.pid_exists(pid_of(d))


def test_added_file_is_refused(image, tmp_path, migrd_config):
    d = damaged_copy(image, tmp_path)
    (d / "extra.img").write_bytes(b"x")
    assert_refused(migrctl("restore", d), 6, "extra.img", "not in the manifest")
    assert not psutil.pid_exists(pid_of(d))


def test_tampered_manifest_is_refused(image, tmp_path, migrd_config):
    d = damaged_copy(image, tmp_path)
    (d / "manifest.json").write_text("{not json")
    assert_refused(migrctl("restore", d), 6, "manifest.json", "not a valid")


def test_directory_that_is_not_a_checkpoint(tmp_path, migrd_config):
    (tmp_path / "plain").mkdir()
    assert_refused(migrctl("restore", tmp_path / "plain"), 6, "not a migrd checkpoint")
    assert_refused(migrctl("restore", tmp_path / "nowhere"), 6, "is not a directory")


def free_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def test_nonexistent_pid(tmp_path, migrd_config):
    assert_refused(migrctl("checkpoint", free_pid(), "--images", tmp_path / "i"), 3, "no process with PID")
    assert not (tmp_path / "i").exists()


def test_pid_1(tmp_path, migrd_config):
    assert_refused(migrctl("checkpoint", 1, "--images", tmp_path / "i"), 4, "PID 1")


def test_non_numeric_pid(tmp_path, migrd_config):
    assert_refused(migrctl("checkpoint", "12abc", "--images", tmp_path / "i"), 3, "not a PID")


def test_nonempty_images_dir_is_refused_and_process_keeps_running(procs, tmp_path, migrd_config):
    p = procs.start(COUNTER, str(tmp_path / "count"))
    (tmp_path / "i").mkdir()
    (tmp_path / "i" / "keep").write_text("mine")
    assert_refused(migrctl("checkpoint", p.pid, "--images", tmp_path / "i"), 3, "not empty")
    assert (tmp_path / "i" / "keep").read_text() == "mine"
    assert p.poll() is None


def test_session_outside_pid_namespace_is_refused_and_process_keeps_running(procs, tmp_path, migrd_config):
    """The init of a PID namespace made without setsid stays in a session it cannot see (as
    everything does that a CI runner starts in PID 1's session 0): CRIU cannot dump it, and
    migrctl says why before CRIU is ever run."""
    out = tmp_path / "count"
    ns = subprocess.Popen(["unshare", "--pid", "--fork", "--", sys.executable, "-c", COUNTER, str(out)],
                          stdin=subprocess.DEVNULL, start_new_session=True)
    procs.popens.append(ns)
    wait_for(lambda: len(values(out)) >= 3, what="counter in its PID namespace")
    procs.adopt(ns.pid)
    pid = psutil.Process(ns.pid).children()[0].pid
    assert_refused(migrctl("checkpoint", pid, "--images", tmp_path / "i"), 4,
                   "outside its PID namespace", "setsid")
    assert not (tmp_path / "i").exists()
    n = len(values(out))
    wait_for(lambda: len(values(out)) > n, what="counter to keep counting")


def test_criu_failure_carries_criu_error_and_process_survives(procs, tmp_path, migrd_config):
    """A process connected to a UNIX socket outside its tree cannot be dumped (the peer would
    be lost): the dump fails, the error is CRIU's own, the process runs on, no directory stays."""
    import socket

    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    addr = f"\0migrd-test-{os.getpid()}"
    listener.bind(addr)
    listener.listen(1)
    script = ("import socket, sys, time  # migrd-workload\n"
              "c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); c.connect('\\0' + sys.argv[1])\n"
              "time.sleep(600)\n")
    try:
        p = procs.start(script, addr[1:])
        conn, _ = listener.accept()
        r = migrctl("checkpoint", p.pid, "--images", tmp_path / "i")
        assert_refused(r, 5, "criu dump failed", "log:")
        assert "RLIMIT_NOFILE" not in r.stderr  # the harmless noise is never named as the cause
        assert p.poll() is None
        assert not (tmp_path / "i").exists()
        conn.close()
    finally:
        listener.close()


def test_not_root_is_refused(tmp_path):
    r = subprocess.run(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                        *MIGRCTL, "restore", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert_refused(r, 4, "needs root")


def loosen(d: Path, how: str) -> str:
    """Make d a directory another user could change; return what the refusal must name."""
    if how == "0777":
        d.chmod(0o777)
        return "mode 0777"
    os.chown(d, 65534, 65534)  # nobody
    return "owned by uid 65534"


@pytest.mark.parametrize("how", ["0777", "nobody"])
def test_image_dir_others_can_write_is_refused_for_checkpoint(procs, tmp_path, migrd_config, how):
    """CRIU would write the process's memory where another user can read and swap it: exit 4
    naming owner or mode, before any dump; the process runs on, once, and nothing is written."""
    out = tmp_path / "count"
    p = procs.start(COUNTER, str(out))
    wait_for(lambda: len(values(out)) >= 3, what="counter")
    d = tmp_path / "i"
    d.mkdir()
    needle = loosen(d, how)
    assert_refused(migrctl("checkpoint", p.pid, "--images", d), 4, str(d), needle, "another user")
    assert list(d.iterdir()) == []
    assert p.poll() is None
    n = len(values(out))
    wait_for(lambda: len(values(out)) > n, what="counter to keep counting")
    assert [q.pid for q in psutil.process_iter(["cmdline"]) if str(out) in (q.info["cmdline"] or [])] == [p.pid]


@pytest.mark.parametrize("how", ["0777", "nobody"])
def test_image_dir_others_can_write_is_refused_for_restore(image, tmp_path, migrd_config, how):
    """Its owner could have swapped an image and re-hashed the manifest: a root restore of it
    would run their code. Refused (exit 4, owner or mode named); nothing is restored."""
    d = damaged_copy(image, tmp_path)
    needle = loosen(d, how)
    assert_refused(migrctl("restore", d), 4, str(d), needle)
    assert not psutil.pid_exists(pid_of(d))


def test_image_dir_inside_a_dir_others_can_write_is_refused(image, tmp_path, migrd_config):
    """Whoever owns the parent can rename a good image directory away and put theirs there."""
    parent = tmp_path / "theirs"
    parent.mkdir()
    d = damaged_copy(image, parent)
    os.chown(parent, 65534, 65534)
    assert_refused(migrctl("restore", d), 4, str(d), f"inside {parent} (uid 65534")
    assert not psutil.pid_exists(pid_of(d))
