"""systemd integration without a running systemd: the unit file passes `systemd-analyze
verify`, and the agent speaks the notify protocol to a real datagram socket (READY=1 after
start-up, WATCHDOG=1 from the loop)."""

from __future__ import annotations

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


@pytest.mark.root
def test_agent_notifies_ready_and_watchdog(tmp_path, notify_socket):
    name, s = notify_socket
    s.settimeout(0.5)
    env = {**os.environ, "MIGRD_CONFIG": str(_config(tmp_path, 5.0)), "NOTIFY_SOCKET": name,
           "WATCHDOG_USEC": "600000"}
    p = subprocess.Popen([sys.executable, "-m", "migrd.daemon"], env=env,
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
        r = subprocess.run([sys.executable, "-m", "migrd.daemon", "--once"], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        msgs = _receive(s, time.monotonic() + 2)
    ready = next(i for i, m in enumerate(msgs) if "READY=1" in m)
    assert any("WATCHDOG=1" in m for m in msgs[ready + 1:]), msgs
    assert (tmp_path / "state" / "decisions.jsonl").exists()
