"""The etcd load registry against a real etcd process (Debian's etcd-server, 3.4), started per
test on 127.0.0.1 with random free ports and a 0700 data dir in the test's temp dir, and killed
by PID at the end. No root needed; skipped with a reason when etcd is not installed.

What is proven: snapshots published by one agent are read by another in one request; a dead
agent's load key and reservation disappear within the lease TTL (measured); two agents
contending for one target never hold more reservations than its slots; etcd killed and
restarted: agents say so, keep running, and pick up again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrbed import etcdserver, sshd
from migrd.adapters import registry
from migrd.config import Config, DaemonSettings, EtcdSettings, HostEntry, SshSettings
from migrd.errors import ConfigError, RegistryError
from migrd.adapters.exchange import Snapshot
from migrd.model import HostLoad
from test_policy import FAST
from test_policy import cand as policy_cand
from test_policy import host as policy_host
from workloads import wait_for

pytestmark = pytest.mark.skipif(not etcdserver.available(), reason="etcd not installed (apt-get install etcd-server)")
TTL = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Etcd:
    """One etcd member on loopback; kill() and start() again on the same data dir and ports."""

    def __init__(self, tmp: Path) -> None:
        self.member = etcdserver.Member("t", "127.0.0.1", free_port(), free_port(), tmp / "etcd-data")
        self.log = tmp / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return self.member.client_url

    def start(self) -> None:
        self.proc = etcdserver.start(self.member, self.log)
        p = self.proc
        etcdserver.wait_healthy(self.member, lambda: p.poll() is None)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # by its PID: this Popen is the process we started
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[Etcd]:
    e = Etcd(tmp_path)
    try:
        e.start()
        yield e
    finally:
        e.kill()


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    key = tmp_path / "id_ed25519"
    sshd.ensure_keypair(key, "test")
    return key


def cfg_for(host: str, url: str, tmp: Path, key: Path, slots: int = 1) -> Config:
    # Peers on a closed loopback port: a link probe fails at once and goes nowhere else.
    closed = free_port()
    hosts = tuple(HostEntry(n, "127.0.0.1", port=closed) for n in ("a", "b", "c", "dead"))
    return Config(host=host, state_dir=tmp / host, hosts=hosts, ssh=SshSettings(client_key=key, connect_timeout=1),
                  daemon=DaemonSettings(registry="etcd", etcd=EtcdSettings(endpoints=(url,), ttl=TTL,
                                                                           target_slots=slots)))


def snap(host: str, t: float | None = None) -> Snapshot:
    load = HostLoad(host=host, time=t or time.time(), source="system", cpus=2, cpu_capacity=2.0,
                    cpu_speed=1.0, loadavg=(0.1, 0.1, 0.1), cpu_util=0.05, run_queue=0,
                    mem_total=1 << 30, mem_available=1 << 29)
    return Snapshot(load, "low", os.getpid())


def seen(reg: registry.EtcdRegistry, name: str) -> bool:
    reg.poll(time.time())
    return any(v.name == name and v.snapshot is not None for v in reg.views())


def test_publish_then_a_peer_reads_it(etcd, tmp_path, client_key):
    a = registry.EtcdRegistry(cfg_for("a", etcd.url, tmp_path, client_key), "a")
    b = registry.EtcdRegistry(cfg_for("b", etcd.url, tmp_path, client_key), "b")
    try:
        a.publish(snap("a"))
        b.poll(time.time())
        views = {v.name: v for v in b.views()}
        assert set(views) == {"a", "c", "dead"}  # every configured peer but itself
        assert views["a"].snapshot is not None and views["a"].snapshot.load.host == "a"
        assert views["c"].snapshot is None and "lease expired" in (views["c"].error or "")
        assert (tmp_path / "a" / "load.json").exists()  # the local file too (`migrctl hosts`)
        assert a.health()["ok"] and b.health() == {"registry": "etcd", "ok": True, "error": None, "note": None}
        # A clean stop revokes the lease: its host leaves target choice at once.
        a.close()
        assert not seen(b, "a")
    finally:
        a.close()
        b.close()


#: A stand-in for an agent that dies: publishes its load, reserves target c, then sleeps
#: until SIGKILL (no revoke, no more keep-alives).
DYING = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_registry import cfg_for, snap
from migrd.adapters import registry
reg = registry.EtcdRegistry(cfg_for("dead", sys.argv[1], Path(sys.argv[2]), Path(sys.argv[2]) / "id_ed25519"), "dead")
reg.publish(snap("dead"))
with reg.reserve("c", "dead:1"):
    print("ready", flush=True)
    time.sleep(600)
"""


def test_dead_agent_drops_out_within_the_ttl(etcd, tmp_path, client_key):
    b = registry.EtcdRegistry(cfg_for("b", etcd.url, tmp_path, client_key), "b")
    child = subprocess.Popen([sys.executable, "-c", DYING, etcd.url, str(tmp_path), str(Path(__file__).parent)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdout.readline() == b"ready\n", child.stderr.read()  # type: ignore[union-attr]
        # Alive for longer than the TTL: the keep-alive thread holds both leases.
        time.sleep(TTL * 2)
        assert seen(b, "dead") and b.reservations("c") == ["dead:1"]
        os.kill(child.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_for(lambda: not seen(b, "dead"), timeout=TTL + 5, what="the dead agent's load key to expire")
        load_gone = time.monotonic() - killed
        wait_for(lambda: b.reservations("c") == [], timeout=TTL + 5, what="its reservation to expire")
        slot_gone = time.monotonic() - killed
        print(f"\nTTL {TTL} s: load key gone {load_gone:.2f} s, reservation gone {slot_gone:.2f} s after SIGKILL")
        # From the last keep-alive (every TTL/3 s) plus etcd's expiry check (every 0.5 s) and
        # the revoke through raft.
        assert load_gone <= TTL + 1.5 and slot_gone <= TTL + 1.5
    finally:
        child.kill()
        child.wait(10)
        b.close()


@pytest.mark.parametrize("slots, contenders", [(1, 2), (2, 4)])
def test_contending_agents_never_exceed_the_target_slots(etcd, tmp_path, client_key, slots, contenders):
    regs = [registry.EtcdRegistry(cfg_for(n, etcd.url, tmp_path, client_key, slots), n)
            for n in ("a", "b", "dead", "c")[:contenders]]
    rounds = 15
    granted = [0] * rounds
    refused = [0] * rounds
    holding = [0]
    peak = [0]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def contend(reg: registry.EtcdRegistry, i: int) -> None:
        for r in range(rounds):
            barrier.wait()
            try:
                with reg.reserve("target", f"{reg.host}:{r}"):
                    with lock:
                        granted[r] += 1
                        holding[0] += 1
                        peak[0] = max(peak[0], holding[0])
                    barrier_held.wait()  # every contender has tried before anyone lets go
                    with lock:
                        holding[0] -= 1
            except registry.ReservationRefused:
                with lock:
                    refused[r] += 1
                barrier_held.wait()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
                barrier.abort()
                barrier_held.abort()
                return

    barrier = threading.Barrier(contenders)
    barrier_held = threading.Barrier(contenders)
    threads = [threading.Thread(target=contend, args=(reg, i)) for i, reg in enumerate(regs)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        print(f"\n{contenders} agents x {rounds} simultaneous rounds, {slots} slot(s): granted per round "
              f"{granted}, peak held at once {peak[0]}")
        assert granted == [slots] * rounds and refused == [contenders - slots] * rounds
        assert peak[0] == slots
        assert regs[0].reservations("target") == []  # every reservation ended with its block
    finally:
        for reg in regs:
            reg.close()


def test_a_full_target_is_left_out_of_target_choice(etcd, tmp_path, client_key):
    """The round after b reserved c's only slot, a does not offer c to its policy (it would only
    be refused the reservation); once b's migration ends, c is back."""
    a = registry.EtcdRegistry(cfg_for("a", etcd.url, tmp_path, client_key), "a")
    b = registry.EtcdRegistry(cfg_for("b", etcd.url, tmp_path, client_key), "b")
    try:
        a.poll(time.time())
        assert a.full_targets() == frozenset()
        with b.reserve("c", "b:1"):
            a.poll(time.time())
            assert a.full_targets() == {"c"}
        a.poll(time.time())
        assert a.full_targets() == frozenset()
    finally:
        a.close()
        b.close()


class BusySource:
    """host's load: 2 runnable tasks per CPU, sampled now (overloaded)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def sample(self) -> HostLoad:
        return policy_host(self.name, 2.0, t=time.time())


def test_two_agents_contending_for_one_target(etcd, tmp_path, client_key, monkeypatch):
    """Two real Agents, both overloaded, run their rounds at the same time with one idle peer c
    (1 reservation slot) in etcd; the orchestrator (faked) holds the first move open until the
    other round is over. Five times: exactly one move to c each time; the other agent was
    refused the reservation or saw c full and stayed."""
    from migrd.agent import loop as agent_mod
    from migrd.engine import migration as migrate
    from migrd.model import PolicyConfig

    calls: list[str] = []
    release = threading.Event()

    def fake_migrate(cfg, ref, pid, opts, progress=None):
        calls.append(cfg.host)
        release.wait(30)
        return migrate.Outcome(id=f"m-{cfg.host}", mode="move", source=cfg.host, target=opts.target, pid=pid,
                               target_pid=999, bytes=1, phases={}, downtime=0.1, dry_run=False)

    monkeypatch.setattr(agent_mod.migrate, "migrate_subject", fake_migrate)
    c = registry.EtcdRegistry(cfg_for("c", etcd.url, tmp_path, client_key), "c")
    outcomes = []
    try:
        for rep in range(5):
            calls.clear()
            release.clear()
            c.publish(Snapshot(policy_host("c", 0.1, t=time.time()), "low", os.getpid()))
            agents = {}
            for name in ("a", "b"):
                cfg = dataclasses.replace(cfg_for(name, etcd.url, tmp_path / str(rep), client_key),
                                          policy=PolicyConfig(hold_s=0.0))
                cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, socket=tmp_path / f"{name}.sock"))
                ag = agent_mod.Agent(cfg, env={})
                ag.source = BusySource(name)
                ag._candidates = lambda: (policy_cand(101, age=600, share=0.5),)  # type: ignore[method-assign]
                for v in ag.peers.views():  # links as if probed: no SSH in this test
                    v.link, v.probed_at = FAST, time.time()
                agents[name] = ag
            threads = {n: threading.Thread(target=ag.round) for n, ag in agents.items()}
            for t in threads.values():
                t.start()
            wait_for(lambda: calls, timeout=30, what="one agent to start a move")
            other = next(n for n in agents if n not in calls)
            threads[other].join(30)  # its round ends without a move while the first one is open
            assert not threads[other].is_alive()
            release.set()
            for t in threads.values():
                t.join(30)
            assert len(calls) == 1, calls
            rec = agents[other].decisions.records()[-1]
            outcomes.append(rec.get("migration", {}).get("outcome") or rec["action"])
            assert rec.get("migration", {}).get("outcome") == "not_reserved" or rec["action"] == "stay", rec
            assert agents[calls[0]].decisions.records()[-1]["migration"]["outcome"] == "ok"
            for ag in agents.values():
                ag.close()
            assert c.reservations("c") == []
        print(f"\ntwo agents, one 1-slot target, 5 simultaneous rounds: 1 move each time; the other: {outcomes}")
    finally:
        release.set()
        c.close()


def test_etcd_killed_and_restarted(etcd, tmp_path, client_key):
    a = registry.EtcdRegistry(cfg_for("a", etcd.url, tmp_path, client_key), "a")
    b = registry.EtcdRegistry(cfg_for("b", etcd.url, tmp_path, client_key), "b")
    try:
        a.publish(snap("a"))
        assert seen(b, "a")
        etcd.kill()
        # Nothing raises: the agent keeps running on local decisions and says why.
        a.publish(snap("a"))
        assert not seen(b, "a")
        h = b.health()
        assert not h["ok"] and "no etcd member answers" in h["error"] and "local load only" in h["note"]
        assert "registry unreachable" in next(v.error for v in b.views() if v.name == "a")
        with pytest.raises(RegistryError, match="is etcd running"):
            with a.reserve("c", "a:1"):
                pass
        assert a.errors()["registry"] >= 1
        time.sleep(TTL + 1)  # down for longer than the TTL: a's lease may be gone afterwards
        etcd.start()
        back = time.monotonic()
        wait_for(lambda: (a.publish(snap("a")), seen(b, "a"))[1], timeout=20, what="a to be seen again")
        print(f"\netcd restarted: a seen by b again {time.monotonic() - back:.2f} s after etcd was healthy")
        assert a.health()["ok"] and b.health()["ok"]
        with a.reserve("c", "a:2"):
            assert b.reservations("c") == ["a:2"]
    finally:
        a.close()
        b.close()


def test_bad_endpoints_are_config_errors():
    with pytest.raises(ConfigError, match="daemon.etcd.endpoints"):
        registry.EtcdClient(("127.0.0.1:2379",), 1.0)
    with pytest.raises(ConfigError, match="is empty"):
        registry.EtcdClient((), 1.0)
    with pytest.raises(Exception, match="loopback or 198.18.0.0/15 only"):
        etcdserver.Member("x", "10.0.0.1", 1, 2, Path("/nonexistent")).argv()
