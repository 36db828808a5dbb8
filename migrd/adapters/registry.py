"""Where an agent finds its peers' load, and how it claims a target: the port `PeerSource`
with two adapters, chosen by `daemon.registry`.

* `SshPeers` (ssh, the default): every agent writes state_dir/load.json and reads each peer's
  over one persistent SFTP session per peer (migrd.exchange). No reservations: right for a
  few hosts, where two sources rarely pick one target in the same second.
* `EtcdRegistry` (etcd): every agent puts its snapshot at PREFIX/load/HOST under a lease it
  keeps alive every ttl/3 seconds, and reads every peer's load in ONE range request per round.
  A dead agent stops keeping its lease alive, so its key, and its host with it, is gone from
  every peer's view within the TTL. Links (RTT, bandwidth) are still measured over SSH, but
  only every `daemon.probe_every` seconds and on a connection closed right after the probe.
  Before a migration the source reserves one of the target's `target_slots` slots
  (PREFIX/reservations/TARGET/SLOT, created only if absent, in one etcd transaction, under a
  lease of its own): at most `target_slots` migrations can be heading for one target, whoever
  their sources are. The slot is deleted when the migration ends, and if its agent dies,
  its lease ends it within the TTL.

  Why slots and not one key per migration counted against the capacity: an etcd transaction
  can compare a key but not count a prefix, so "count, then add" is two requests that two
  sources can interleave; "create slot i if absent" is one atomic compare-and-create.

  The client is etcd3gw (etcd's v3 API through its gRPC gateway, over HTTP): leases,
  transactions and ranges without a gRPC build. etcd unreachable: the agent keeps running on
  local decisions (no peer is a target, so nothing moves), and says so in `migrctl status`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
import urllib.parse
from collections.abc import Collection, Iterator
from typing import Any, Callable, Protocol, TypeVar

import etcd3gw
import paramiko
import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import ConnectionFailedError, ConnectionTimeoutError, Etcd3Exception
from etcd3gw.lease import Lease

from migrd.adapters import exchange, transport
from migrd.config import Config
from migrd.core.peerset import PeerSet, Probe
from migrd.model import Link
from migrd.errors import ConfigError, MigrdError, RegistryError
from migrd.adapters.exchange import PeerView, Snapshot

log = logging.getLogger(__name__)
T = TypeVar("T")
#: What a probe or an offer over a fresh SSH connection may raise besides our own errors
#: (paramiko's, and the socket's): the round goes on, the peer is retried later.
SSH_FAILURES = (MigrdError, OSError, EOFError, paramiko.SSHException)


class ReservationRefused(RegistryError):
    """Every reservation slot of the target is taken by other migrations."""


class PeerSource(Protocol):
    kind: str

    def publish(self, snap: Snapshot) -> None:
        """Make this host's snapshot visible to its peers; never raises."""

    def poll(self, now: float, also: Collection[str] = ()) -> frozenset[str]:
        """Refresh the snapshots (and now and then the links) of this round's probe set
        (`daemon.probe`) and of the peers in `also`; return whose were read. Never raises."""

    def views(self) -> list[PeerView]:
        """Every peer's last view, read this round or earlier."""

    def full_targets(self) -> frozenset[str]:
        """Peers whose reservation slots were all taken at the last poll: not worth choosing."""

    def reserve(self, target: str, ident: str) -> contextlib.AbstractContextManager[None]:
        """Hold a place on target for one migration while the block runs (ReservationRefused:
        the target is full; RegistryError: the registry cannot be asked)."""

    def ask_for_work(self, src: str, requester: str) -> tuple[bool, str]:
        """Fill mode: ask the busy peer src for work; (asked, why not)."""

    def health(self) -> dict[str, Any]:
        """For `migrctl status`: which registry, whether it answers, its last error."""

    def errors(self) -> dict[str, int]:
        """Failures so far (monotonic): peer name or 'registry' -> count."""

    def close(self) -> None: ...


def make(cfg: Config, host: str) -> PeerSource:
    if cfg.daemon.registry == "etcd":
        return EtcdRegistry(cfg, host)
    return SshPeers(cfg, host)


def offer(conn: transport.Connection, requester: str, timeout: float) -> tuple[bool, str]:
    r = conn.migrctl(["peer", "offer", requester, "--json"], timeout=timeout)
    return r.status == 0, r.stderr.decode(errors="replace").strip()


def peer_names(cfg: Config, host: str) -> list[str]:
    return [h.name for h in cfg.hosts if h.name != host]


def peer_set(cfg: Config, host: str) -> PeerSet:
    return PeerSet(Probe.parse(cfg.daemon.probe), host, peer_names(cfg, host))


def to_read(peers: PeerSet, rng: random.Random, also: Collection[str]) -> frozenset[str]:
    """This round's probe set plus the peers in `also` that are known (an asker is read)."""
    return frozenset(peers.this_round(rng)) | (frozenset(also) & frozenset(peers.others))


# --------------------------------------------------------------------------- ssh


class SshPeers:
    kind = "ssh"

    def __init__(self, cfg: Config, host: str) -> None:
        self.cfg = cfg
        self.readers = {n: exchange.PeerReader(cfg, n) for n in peer_names(cfg, host)}
        self.peers = peer_set(cfg, host)
        self.rng = random.Random()
        self._errors: dict[str, int] = {}

    def publish(self, snap: Snapshot) -> None:
        exchange.publish(self.cfg.state_dir, snap)

    def poll(self, now: float, also: Collection[str] = ()) -> frozenset[str]:
        read = to_read(self.peers, self.rng, also)
        for name, r in self.readers.items():
            if name not in read:
                if self.peers.fixed is None:
                    r.close()  # random: sessions to the peers drawn last round only
                continue
            before = r.view.failures
            r.poll(now)
            if r.view.failures > before:
                self._errors[name] = self._errors.get(name, 0) + 1
        return read

    def views(self) -> list[PeerView]:
        return [r.view for r in self.readers.values()]

    def full_targets(self) -> frozenset[str]:
        return frozenset()  # no reservations without a registry

    def reserve(self, target: str, ident: str) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def ask_for_work(self, src: str, requester: str) -> tuple[bool, str]:
        try:
            return offer(self.readers[src].connection(), requester, self.cfg.ssh.op_timeout)
        except MigrdError as e:
            return False, str(e)

    def health(self) -> dict[str, Any]:
        return {"registry": self.kind, "ok": True, "error": None}

    def errors(self) -> dict[str, int]:
        return dict(self._errors)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


# --------------------------------------------------------------------------- etcd


def load_key(prefix: str, host: str) -> str:
    return f"{prefix}load/{host}"


def slot_key(prefix: str, target: str, slot: int) -> str:
    return f"{prefix}reservations/{target}/{slot}"


def endpoint(url: str) -> tuple[str, int, str]:
    """http://ADDR:PORT -> (host, port, protocol) for etcd3gw."""
    u = urllib.parse.urlsplit(url)
    if u.scheme not in ("http", "https") or not u.hostname or not u.port:
        raise ConfigError(f"key 'daemon.etcd.endpoints': {url!r} is not http(s)://ADDRESS:PORT")
    return u.hostname, u.port, u.scheme


class EtcdClient:
    """etcd3gw clients for the configured endpoints; a request that cannot reach one member
    moves on to the next. Every etcd3gw/requests failure becomes one RegistryError line."""

    def __init__(self, endpoints: tuple[str, ...], timeout: float) -> None:
        if not endpoints:
            raise ConfigError("key 'daemon.etcd.endpoints' is empty: name at least one etcd member")
        # api_path pinned: etcd >= 3.4 serves /v3/ (3.4 also /v3beta/); no /version round trip.
        self._clients = [etcd3gw.client(host=h, port=p, protocol=s, timeout=timeout, api_path="/v3/")
                         for h, p, s in map(endpoint, endpoints)]
        self._urls = list(endpoints)
        self._at = 0

    def call(self, fn: Callable[[Etcd3Client], T]) -> T:
        last = ""
        for _ in self._clients:
            c, url = self._clients[self._at], self._urls[self._at]
            try:
                return fn(c)
            except (Etcd3Exception, requests.RequestException) as e:
                last = f"etcd at {url}: {_reason(e)}"
                if not _unreachable(e):
                    raise RegistryError(last) from None
                self._at = (self._at + 1) % len(self._clients)
        raise RegistryError(f"{last} (no etcd member answers; is etcd running?)")


def _reason(e: Exception) -> str:
    detail = getattr(e, "detail_text", None)
    text = detail if isinstance(detail, str) and detail else str(e)
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def _unreachable(e: Exception) -> bool:
    return isinstance(e, (ConnectionFailedError, ConnectionTimeoutError,
                          requests.ConnectionError, requests.Timeout))


class EtcdRegistry:
    kind = "etcd"

    def __init__(self, cfg: Config, host: str) -> None:
        self.cfg, self.host = cfg, host
        e = cfg.daemon.etcd
        self.prefix, self.ttl, self.slots = e.prefix, e.ttl, e.target_slots
        # requests sessions are not shared between threads: the keeper has its own client.
        self.client = EtcdClient(e.endpoints, e.timeout)
        self._keeper_client = EtcdClient(e.endpoints, e.timeout)
        self._views = {n: PeerView(n) for n in peer_names(cfg, host)}
        self.peers = peer_set(cfg, host)
        self.rng = random.Random()
        self._full: frozenset[str] = frozenset()
        self._lock = threading.Lock()
        self._session: Lease | None = None  # holds this host's load key
        self._held: set[int] = set()  # lease ids kept alive: the session's and live reservations'
        self._error: str | None = None
        self._errors: dict[str, int] = {}
        self._stop = threading.Event()
        self._keeper = threading.Thread(target=self._keep_alive, name="etcd-keepalive", daemon=True)
        self._keeper.start()

    # --- leases -------------------------------------------------------------------------

    def _keep_alive(self) -> None:
        while not self._stop.wait(max(self.ttl / 3, 0.5)):
            with self._lock:
                held = set(self._held)
            for lease_id in held:
                try:
                    left = self._keeper_client.call(lambda c: Lease(lease_id, c).refresh())
                except RegistryError as e:
                    self._failed(e)
                    break
                if left <= 0:  # expired (etcd was away longer than the TTL): start again
                    with self._lock:
                        self._held.discard(lease_id)
                        if self._session is not None and self._session.id == lease_id:
                            self._session = None

    def _failed(self, e: RegistryError) -> None:
        with self._lock:
            if self._error != str(e):
                log.warning("registry: %s; deciding on local load only until it answers", e)
            self._error = str(e)
            self._errors["registry"] = self._errors.get("registry", 0) + 1

    def _ok(self) -> None:
        with self._lock:
            if self._error is not None:
                log.warning("registry: etcd answers again")
            self._error = None

    def _new_lease(self) -> Lease:
        lease = self.client.call(lambda c: c.lease(ttl=self.ttl))
        with self._lock:
            self._held.add(lease.id)
        return lease

    def _drop(self, lease: Lease) -> None:
        with self._lock:
            self._held.discard(lease.id)
        with contextlib.suppress(RegistryError):  # unreachable: it expires within the TTL
            self.client.call(lambda c: lease.revoke())

    # --- PeerSource ---------------------------------------------------------------------

    def publish(self, snap: Snapshot) -> None:
        exchange.publish(self.cfg.state_dir, snap)  # `migrctl hosts` and ssh-registry peers
        key = load_key(self.prefix, self.host)
        try:
            for _ in range(2):
                with self._lock:
                    session = self._session
                if session is None:
                    session = self._new_lease()
                    with self._lock:
                        self._session = session
                try:
                    self.client.call(lambda c: c.put(key, snap.to_json(), lease=session))
                    break
                except RegistryError as e:
                    if "lease not found" not in str(e):
                        raise
                    with self._lock:  # expired while etcd was away: a new lease, once
                        self._held.discard(session.id)
                        self._session = None
            else:
                raise RegistryError(f"etcd lost this host's lease twice in a row; {key} not written")
            self._ok()
        except RegistryError as e:
            self._failed(e)

    def poll(self, now: float, also: Collection[str] = ()) -> frozenset[str]:
        read = to_read(self.peers, self.rng, also)
        try:  # one range over the whole prefix: every load key and every reservation
            rows = self.client.call(lambda c: c.get_prefix(self.prefix))
            self._ok()
        except RegistryError as e:
            self._failed(e)
            self._full = frozenset()
            for v in self._views.values():
                v.snapshot, v.error = None, f"registry unreachable: {e}"
            return read
        found: dict[str, Snapshot] = {}
        slots: dict[str, int] = {}
        for value, meta in rows:
            kind, _, rest = meta["key"].decode().removeprefix(self.prefix).partition("/")
            if kind == "reservations":
                target = rest.partition("/")[0]
                slots[target] = slots.get(target, 0) + 1
            elif kind == "load":
                try:
                    found[rest] = Snapshot.from_json(value)
                except (ValueError, KeyError) as e:
                    log.info("registry: bad snapshot of %s: %s", rest, e)
        self._full = frozenset(t for t, n in slots.items() if n >= self.slots)
        for v in self._views.values():
            v.snapshot = found.get(v.name)
            if v.snapshot is None:
                v.error = "no load key in etcd (its agent is down or its lease expired)"
            elif v.name in read and (v.link is None or now - v.probed_at >= self.cfg.daemon.probe_every):
                self._probe(v, now)  # links only of the peers the round reads
            else:
                v.error = None
        return read

    def _probe(self, v: PeerView, now: float) -> None:
        if now < v.retry_at:
            return
        try:
            with transport.connect(self.cfg, v.name) as conn:
                est = conn.probe(rounds=3, bulk_bytes=self.cfg.daemon.probe_bytes, bulk_seconds=0.5)
            v.link, v.probed_at, v.error, v.failures = Link(est.rtt_s, est.bandwidth_bytes_per_s), now, None, 0
        except SSH_FAILURES as e:
            v.failures += 1
            v.retry_at = now + exchange.backoff(v.failures)
            v.error = f"link probe: {e or type(e).__name__}"
            with self._lock:
                self._errors[v.name] = self._errors.get(v.name, 0) + 1

    def views(self) -> list[PeerView]:
        return list(self._views.values())

    def full_targets(self) -> frozenset[str]:
        return self._full

    @contextlib.contextmanager
    def reserve(self, target: str, ident: str) -> Iterator[None]:
        lease = self._new_lease()
        try:
            slot = next((i for i in range(self.slots) if self.client.call(
                lambda c: c.create(slot_key(self.prefix, target, i), ident, lease=lease))), None)
        except RegistryError:
            self._drop(lease)
            raise
        if slot is None:
            self._drop(lease)
            raise ReservationRefused(f"target {target} already receives {self.slots} migration(s) "
                                     f"(daemon.etcd.target_slots); trying again after the host cooldown")
        log.info("reserved %s slot %d for %s", target, slot, ident)
        try:
            yield
        finally:
            self._drop(lease)  # revoking the lease deletes the slot

    def ask_for_work(self, src: str, requester: str) -> tuple[bool, str]:
        try:
            with transport.connect(self.cfg, src) as conn:
                return offer(conn, requester, self.cfg.ssh.op_timeout)
        except SSH_FAILURES as e:
            return False, str(e) or type(e).__name__

    def health(self) -> dict[str, Any]:
        with self._lock:
            err = self._error
        return {"registry": self.kind, "ok": err is None, "error": err,
                "note": "deciding on local load only: no peer is a target until etcd answers" if err else None}

    def errors(self) -> dict[str, int]:
        with self._lock:
            return dict(self._errors)

    def reservations(self, target: str) -> list[str]:
        """Who holds target's slots now (tests, `migrctl status`)."""
        rows = self.client.call(lambda c: c.get_prefix(f"{self.prefix}reservations/{target}/"))
        return [v.decode() for v, _ in rows]

    def close(self) -> None:
        self._stop.set()
        self._keeper.join(timeout=5)
        with self._lock:
            session, self._session = self._session, None
        if session is not None:  # a clean stop leaves target choice at once, not after the TTL
            self._drop(session)


def ident(host: str, pid: int) -> str:
    return f"{host}:{pid}:{time.time():.3f}"
