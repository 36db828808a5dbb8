"""Load exchange between agents.

Choice (measured against the alternative in bench/agent.py): every agent writes its latest
snapshot atomically to state_dir/load.json, and reads each peer's file over ONE persistent
SSH connection per peer through SFTP. sshd serves SFTP with internal-sftp inside the session
it already has, so a read spawns no process on either side and costs one small request/answer
on an open channel; running `migrctl` over SSH instead would start sshd's session, a shell and
a Python interpreter on the peer every round. A failed peer is retried with exponential
backoff (1 s doubling to 60 s), so a dead host costs nothing between attempts. The link to a
peer is probed (RTT + a bulk write of daemon.probe_bytes) when the connection opens and every
daemon.probe_every seconds, not every round. A peer's snapshot whose own timestamp is older
than daemon.peer_stale_after is ignored by the agent (a peer whose agent died stops counting).

Peers are assumed to keep their state in the same state_dir as this host (one deployment
layout across the cluster).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko

from migrd.adapters import private, transport, untrusted
from migrd.config import Config
from migrd.model import HostLoad, Link
from migrd.errors import InputError, MigrdError

log = logging.getLogger(__name__)
SNAPSHOT = "load.json"
BACKOFF_MIN, BACKOFF_MAX = 1.0, 60.0


@dataclass(frozen=True)
class Snapshot:
    """What an agent publishes: its load and the level its policy gave it."""

    load: HostLoad
    level: str
    agent_pid: int

    def to_json(self) -> bytes:
        return json.dumps({"format": 1, "load": self.load.to_dict(), "level": self.level,
                           "agent_pid": self.agent_pid}).encode()

    @classmethod
    def from_json(cls, data: bytes, origin: str = SNAPSHOT) -> Snapshot:
        """A peer's snapshot; InputError naming origin for anything malformed. Keys a newer
        migrd added are ignored."""
        snap = untrusted.build(cls, untrusted.loads(data, InputError, origin), InputError, origin)
        if snap.load.cpu_capacity <= 0 or snap.load.cpu_speed <= 0:
            raise InputError(f"{origin}: cpu_capacity and cpu_speed must be positive")
        return snap


def publish(state_dir: Path, snap: Snapshot) -> None:
    """Write the snapshot so a reader sees the old or the new file, never half of one."""
    # Rewritten every round; losing the last one to a crash costs nothing.
    private.write_atomic(private.private_dir(state_dir) / SNAPSHOT, snap.to_json(), durable=False)


@dataclass
class PeerView:
    """What this agent knows about one peer (mutable: the shell's bookkeeping)."""

    name: str
    snapshot: Snapshot | None = None
    link: Link | None = None
    probed_at: float = 0.0
    error: str | None = None
    failures: int = 0
    retry_at: float = 0.0

    def to_dict(self, now: float) -> dict[str, Any]:
        s = self.snapshot
        return {"name": self.name, "level": s.level if s else None,
                "age_s": round(now - s.load.time, 3) if s else None,
                "load": s.load.to_dict() if s else None,
                "link": {"rtt_s": self.link.rtt_s, "bandwidth": self.link.bandwidth} if self.link else None,
                "error": self.error}


def backoff(failures: int) -> float:
    return min(BACKOFF_MIN * 2 ** max(failures - 1, 0), BACKOFF_MAX)


class PeerReader:
    """One persistent SSH + SFTP session to one peer."""

    def __init__(self, cfg: Config, name: str) -> None:
        self.cfg = cfg
        self.view = PeerView(name)
        self._conn: transport.Connection | None = None
        self._sftp: paramiko.SFTPClient | None = None

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        if self._conn is not None:
            self._conn.close()
        self._sftp = self._conn = None

    def connection(self) -> transport.Connection:
        """The open SSH connection to this peer (fill mode asks for work over it)."""
        if self._conn is None:
            raise MigrdError(f"{self.view.name}: not connected (its load could not be read)")
        return self._conn

    def poll(self, now: float) -> None:
        """Refresh the peer's snapshot (and its link now and then); never raises."""
        v = self.view
        if now < v.retry_at:
            return
        try:
            if self._sftp is None:
                self._conn = transport.connect(self.cfg, v.name)
                self._sftp = self._conn._client.open_sftp()  # type: ignore[union-attr]
                self._sftp.get_channel().settimeout(self.cfg.ssh.connect_timeout)
            if v.link is None or now - v.probed_at >= self.cfg.daemon.probe_every:
                est = self._conn.probe(rounds=3, bulk_bytes=self.cfg.daemon.probe_bytes,  # type: ignore[union-attr]
                                       bulk_seconds=0.5)
                v.link, v.probed_at = Link(est.rtt_s, est.bandwidth_bytes_per_s), now
            with self._sftp.open(str(self.cfg.state_dir / SNAPSHOT), "rb") as f:
                v.snapshot = Snapshot.from_json(f.read(), f"{v.name}:{self.cfg.state_dir / SNAPSHOT}")
            v.error, v.failures = None, 0
        except FileNotFoundError:
            v.error = "no snapshot yet (is its agent running?)"
        except (MigrdError, OSError, EOFError, paramiko.SSHException, ValueError, KeyError) as e:
            self._failed(now, str(e) or type(e).__name__)
        except Exception as e:  # a bug: it must cost this peer's view, never the agent's loop
            log.debug("peer %s: unexpected error", v.name, exc_info=True)
            self._failed(now, f"unexpected {type(e).__name__}: {e}")

    def _failed(self, now: float, error: str) -> None:
        v = self.view
        v.failures += 1
        v.retry_at = now + backoff(v.failures)
        v.error = error
        log.info("peer %s: %s (retry in %.0f s)", v.name, v.error, v.retry_at - now)
        self.close()
