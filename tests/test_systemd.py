"""systemd integration without a running systemd: the unit file passes `systemd-analyze
verify`, and the agent speaks the notify protocol to a real datagram socket: READY=1 only after
start-up recovery, WATCHDOG=1 at most half the watchdog period apart, between rounds and
through a migration that blocks the loop."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
UNIT = ROOT / "systemd" / "migrd.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path):
    # As `make install` writes it: ExecStart points at this checkout's migrd.
    migrd = Path(sys.executable).parent / "migrd"
    text = UNIT.read_text().replace("ExecStart=/usr/local/bin/migrd ", f"ExecStart={migrd} ")
    assert f"ExecStart={migrd} run" in text
    (tmp_path / "migrd.service").write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "migrd.service")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    for key in ("Type=notify", "WatchdogSec=", "Restart=on-failure", "StateDirectory=migrd",
                "RuntimeDirectory=migrd", "MIGRD_CONFIG=/etc/migrd/migrd.yaml"):
        assert key in text


def _config(tmp_path: Path, interval: float) -> Path:
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ndaemon:\n  interval: {interval}\n"
                   f"  socket: {tmp_path / 'run' / 'migrd.sock'}\n")
    return cfg


def _receive(s: socket.socket, until: float) -> list[str]:
    got = []
    while time.monotonic() < until:
        try:
            got.append(s.recv(4096).decode())
        except socket.timeout:
            break
    return got


#: Settings that make systemd run the service in its own mount namespace (systemd's
#: exec_needs_mount_namespace), each with the value that leaves it off (None: any value).
MOUNT_NAMESPACE_SETTINGS = {
    "PrivateTmp": "no", "PrivateDevices": "no", "PrivateMounts": "no", "ProtectSystem": "no",
    "ProtectHome": "no", "ProtectKernelTunables": "no", "ProtectKernelModules": "no",
    "ProtectKernelLogs": "no", "ProtectControlGroups": "no", "ProtectProc": "default",
    "ProcSubset": "all", "PrivateIPC": "no", "PrivatePIDs": "no", "PrivateBPF": "no",
    "TemporaryFileSystem": None, "ReadOnlyPaths": None, "ReadWritePaths": None,
    "InaccessiblePaths": None, "ExecPaths": None, "NoExecPaths": None, "BindPaths": None,
    "BindReadOnlyPaths": None, "RootDirectory": None, "RootImage": None, "MountAPIVFS": "no",
}


def test_the_unit_shares_the_hosts_mount_namespace():
    """CRIU run from a mount namespace other than the workload's dumps that whole mount tree
    (and the target rebuilds it); on the VMs every dump the agent started failed so while
    ProtectKernelLogs gave it a namespace of its own."""
    settings = [line.split("=", 1) for line in UNIT.read_text().splitlines()
                if "=" in line and not line.lstrip().startswith("#")]
    own = [f"{k}={v}" for k, v in settings
           if k in MOUNT_NAMESPACE_SETTINGS and v.strip() != MOUNT_NAMESPACE_SETTINGS[k]]
    assert not own, f"these give the agent its own mount namespace: {own}"
    assert not any(k == "MountFlags" and v.strip() not in ("", "shared") for k, v in settings)


@pytest.mark.root
def test_agent_notifies_ready_and_watchdog(tmp_path, notify_socket):
    name, s = notify_socket
    s.settimeout(0.5)
    env = {**os.environ, "MIGRD_CONFIG": str(_config(tmp_path, 5.0)), "NOTIFY_SOCKET": name,
           "WATCHDOG_USEC": "600000"}
    p = subprocess.Popen([sys.executable, "-m", "migrd.agent.daemon"], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        got: list[str] = []
        deadline = time.monotonic() + 30
        # Pings come well within the 0.6 s watchdog although rounds are 5 s apart.
        while not (any("READY=1" in m for m in got) and sum("WATCHDOG=1" in m for m in got) >= 3):
            assert time.monotonic() < deadline and p.poll() is None, got
            try:
                got.append(s.recv(4096).decode())
            except socket.timeout:
                pass
    finally:
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    assert rc == 0
    assert any("STOPPING=1" in m for m in _receive(s, time.monotonic() + 1) + got)


@pytest.mark.root
def test_once_notifies_ready_then_watchdog(tmp_path):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(2)
        env = {**os.environ, "MIGRD_CONFIG": str(_config(tmp_path, 1.0)), "NOTIFY_SOCKET": str(path),
               "WATCHDOG_USEC": "30000000"}
        r = subprocess.run([sys.executable, "-m", "migrd.agent.daemon", "--once"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        msgs = _receive(s, time.monotonic() + 2)
    ready = next(i for i, m in enumerate(msgs) if "READY=1" in m)
    assert any("WATCHDOG=1" in m for m in msgs[ready + 1:]), msgs
    assert (tmp_path / "state" / "decisions.jsonl").exists()


def _notifications(s: socket.socket, until: float, stop=lambda got: False) -> list[tuple[float, str]]:
    """(time.time() at arrival, message) for each datagram until `until` (monotonic) or stop(got)."""
    got: list[tuple[float, str]] = []
    while time.monotonic() < until and not stop(got):
        try:
            data = s.recv(4096)
        except socket.timeout:
            continue
        got.append((time.time(), data.decode()))
    return got


def _gaps(got: list[tuple[float, str]]) -> list[float]:
    pings = [t for t, m in got if "WATCHDOG=1" in m]
    return [b - a for a, b in zip(pings, pings[1:])]


@pytest.mark.root
def test_watchdog_pings_come_within_half_the_period(tmp_path):
    """sd_watchdog_enabled(3) asks for pings at half WATCHDOG_USEC; migrd pings every third of it
    (docs/agent.md), between rounds as well as after them."""
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(0.5)
        env = {**os.environ, "MIGRD_CONFIG": str(_config(tmp_path, 10.0)), "NOTIFY_SOCKET": str(path),
               "WATCHDOG_USEC": "6000000"}
        p = subprocess.Popen([sys.executable, "-m", "migrd.agent.daemon"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            ready = _notifications(s, time.monotonic() + 60, lambda got: any("READY=1" in m for _, m in got))
            assert ready and "READY=1" in ready[-1][1], ready
            got = _notifications(s, time.monotonic() + 20)  # two 10 s rounds: pings between them too
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
    gaps = _gaps(got)
    assert len(gaps) >= 6, got  # ~10 pings in 20 s at one per 2 s
    assert max(gaps) <= 3.0, gaps  # never more than half the 6 s period apart


@pytest.mark.root
def test_ready_comes_only_after_start_up_recovery(tmp_path):
    """An unfinished journal whose target never answers SSH (a listener that sends no banner)
    takes two connect timeouts to recover; READY=1 must come after that, not before."""
    from migrd import config as config_mod
    from migrd.config import HostEntry
    from migrbed import sshd
    from migrd.engine.journal import Journal

    with socket.socket() as silent, socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        cfg_path = _config(tmp_path, 5.0)
        cfg = config_mod.parse(cfg_path.read_text())
        key = sshd.ensure_keypair(tmp_path / "id_ed25519")
        cfg = dataclasses.replace(cfg, host="a", hosts=(HostEntry("b", "127.0.0.1", silent.getsockname()[1]),),
                                  ssh=dataclasses.replace(cfg.ssh, client_key=key, connect_timeout=2.0))
        cfg_path.write_text(config_mod.dump(cfg))
        j = Journal(tmp_path / "state" / "migrations" / "20260101-000000000-abcdef")
        # A complete journal (recovery refuses an incomplete one as corrupt before it acts).
        process = {"pid": 1, "cmdline": ["sleep"], "exe": "/bin/sleep", "cwd": "/", "uid": 0,
                   "rss": 0, "start_time": 0.0}
        j.record("precheck", source="a", options={"target": "b"}, process=process, carry=[],
                 request={"pid": 1, "start_time": 0.0, "target": "b", "mode": "move"})
        j.record("restore")  # the target may run a copy: recovery must ask it, and cannot
        s.bind(str(tmp_path / "notify"))
        s.settimeout(0.5)
        env = {**os.environ, "MIGRD_CONFIG": str(cfg_path), "NOTIFY_SOCKET": str(tmp_path / "notify")}
        started = time.time()
        p = subprocess.Popen([sys.executable, "-m", "migrd.agent.daemon"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            got = _notifications(s, time.monotonic() + 90, lambda got: any("READY=1" in m for _, m in got))
            states = [r.state for r in j.records()]
        finally:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=30)
    ready_at = next(t for t, m in got if "READY=1" in m)
    assert states[-1] == "in_doubt", states  # recovered (as far as it can) when READY arrived
    assert j.records()[-1].time < ready_at
    assert ready_at - started >= 2 * 2.0  # both connection attempts were waited for first


@pytest.mark.root
def test_watchdog_keeps_coming_during_a_long_migration(tmp_path, monkeypatch):
    """A migration held at `transfer` by its failpoint (5 s) blocks the agent's loop; the pinging
    thread must keep the watchdog (1.5 s) fed all along."""
    from migrd.agent import loop as agent_mod
    from migrd import config as config_mod
    from migrd.engine import failpoints, migration as migrate
    from migrd.model import Action
    from migrd.model import Decision, Level, Mode

    def held_migration(cfg, ref, pid, opts, progress=None):
        failpoints.step("transfer")
        return migrate.Outcome(id="m1", mode="move", source="a", target=opts.target, pid=pid, target_pid=2,
                               bytes=1, phases={}, downtime=0.1, dry_run=False)

    monkeypatch.setenv(failpoints.ENV, "transfer:delay")
    monkeypatch.setattr(agent_mod.migrate, "migrate_subject", held_migration)
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        s.settimeout(0.2)
        a = agent_mod.Agent(config_mod.parse(_config(tmp_path, 5.0).read_text()),
                            env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1500000"})
        d = Decision(Action.MIGRATE, Mode.OFFLOAD, Level.HIGH, "a", pid=7, target="b")
        t0 = time.monotonic()
        a._act(d, migrate.Options(target="b"), {"time": time.time()})
        took = time.monotonic() - t0
        got = _notifications(s, time.monotonic() + 0.5)
    assert took >= failpoints.DELAY_SECONDS
    gaps = _gaps(got)
    assert len(gaps) >= 6, got  # a ping every 0.5 s through the 5 s hold
    assert max(gaps) <= 0.75, gaps  # half the period
