"""Throwaway single-member etcd servers for the bed (`bed up --registry etcd`) and the tests:
Debian's `etcd` binary (package etcd-server) on a private data directory, listening only on a
loopback or bed address (127.0.0.0/8, 198.18.0.0/15), never anywhere else. A real cluster runs
its own etcd; migrd only needs its client URLs (daemon.etcd.endpoints).
"""

from __future__ import annotations

import ipaddress
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import command
from migrd.errors import CommandError, InputError
from migrd.adapters.private import open_private, private_dir

ALLOWED = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("198.18.0.0/15"))
#: Run under the caller's prefix (e.g. nsenter into the bed's bridge namespace), so the check
#: reaches the address where etcd listens.
HEALTH = ("import json, sys, urllib.request\n"
          "sys.exit(0 if json.load(urllib.request.urlopen(sys.argv[1] + '/health', timeout=1))"
          ".get('health') == 'true' else 1)")


@dataclass(frozen=True)
class Member:
    name: str
    address: str
    client_port: int
    peer_port: int
    data_dir: Path

    @property
    def client_url(self) -> str:
        return f"http://{self.address}:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://{self.address}:{self.peer_port}"

    def argv(self) -> list[str]:
        ip = ipaddress.ip_address(self.address)
        if not any(ip in net for net in ALLOWED):
            raise InputError(f"etcd for the bed and tests listens on loopback or 198.18.0.0/15 only, "
                             f"not {self.address}")
        return ["etcd", "--name", self.name, "--data-dir", str(self.data_dir),
                "--listen-client-urls", self.client_url, "--advertise-client-urls", self.client_url,
                "--listen-peer-urls", self.peer_url, "--initial-advertise-peer-urls", self.peer_url,
                "--initial-cluster", f"{self.name}={self.peer_url}"]


def available() -> bool:
    return shutil.which("etcd") is not None


def start(m: Member, log_file: Path, prefix: Sequence[str] = ()) -> subprocess.Popen[bytes]:
    """Start the member (its data directory 0700) in its own session; the caller keeps the PID
    and ends it by that PID."""
    if not available():
        raise CommandError("etcd is not installed: `apt-get install etcd-server` (make setup does)")
    private_dir(m.data_dir)
    with os.fdopen(open_private(log_file, os.O_WRONLY | os.O_APPEND), "ab") as out:
        return command.spawn([*prefix, *m.argv()], stdout=out, stderr=out)


def wait_healthy(m: Member, alive: Callable[[], bool], timeout: float = 30.0,
                 prefix: Sequence[str] = ()) -> None:
    deadline = time.monotonic() + timeout
    argv = [*prefix, sys.executable, "-c", HEALTH, m.client_url]
    while command.run(argv, check=False, timeout=10).returncode != 0:
        if not alive():
            raise CommandError(f"etcd {m.name} at {m.client_url} exited; see its log")
        if time.monotonic() >= deadline:
            raise CommandError(f"etcd {m.name} at {m.client_url} not healthy after {timeout:g} s; see its log")
        time.sleep(0.2)
