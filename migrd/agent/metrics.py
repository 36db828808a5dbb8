"""The agent's Prometheus metrics (daemon.metrics; off by default), with the official client
library on a registry of the agent's own (no process-global state).

Served at http://daemon.metrics.address:port/metrics, on that one address only. Names:

  migrd_rounds_total                               agent rounds
  migrd_decisions_total{action}                    decisions by action (stay, migrate, ...)
  migrd_migrations_total{outcome,strategy}         migrations decided by this agent: outcome ok,
                                                   failed or not_reserved (target full or etcd
                                                   away); strategy stream-copy, stop-copy, restart, or
                                                   move (failed before the strategy was known)
  migrd_migration_seconds                          histogram of a migration's total time
  migrd_migration_downtime_seconds                 histogram of the workload's downtime
  migrd_migration_bytes_total                      bytes moved by this host's migrations
  migrd_host_load_per_cpu{host}                    1-minute load per CPU of capacity, this host
                                                   and every peer with a snapshot
  migrd_host_cpu_utilization{host}                 busy fraction of capacity, same hosts
  migrd_registry_errors_total                      failed requests to the registry (etcd)
  migrd_peer_errors_total{peer}                    failed reads or probes of a peer
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from migrd.config import MetricsSettings
from migrd.errors import ConfigError
from migrd.model import HostLoad

#: Downtime is seconds at most; a whole migration of a large process can take a minute or more.
DOWNTIME_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TOTAL_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


def strategy(mode: str, name: str | None) -> str:
    """How the process moved: restart (weak mobility) or the strategy's name (stream-copy,
    stop-copy, ...); "move" when a move failed or was not started before it was chosen."""
    if mode == "restart":
        return "restart"
    return name or "move"


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.rounds = Counter("migrd_rounds", "Agent rounds", registry=r)
        self.decisions = Counter("migrd_decisions", "Decisions by action", ["action"], registry=r)
        self.migrations = Counter("migrd_migrations", "Migrations started by this agent",
                                  ["outcome", "strategy"], registry=r)
        self.total = Histogram("migrd_migration_seconds", "A migration's total time",
                               buckets=TOTAL_BUCKETS, registry=r)
        self.downtime = Histogram("migrd_migration_downtime_seconds", "The workload's downtime",
                                  buckets=DOWNTIME_BUCKETS, registry=r)
        self.bytes = Counter("migrd_migration_bytes", "Bytes moved by this host's migrations", registry=r)
        self.load = Gauge("migrd_host_load_per_cpu", "1-minute load per CPU of capacity", ["host"], registry=r)
        self.util = Gauge("migrd_host_cpu_utilization", "Busy fraction of CPU capacity", ["host"], registry=r)
        self.registry_errors = Counter("migrd_registry_errors", "Failed requests to the load registry",
                                       registry=r)
        self.peer_errors = Counter("migrd_peer_errors", "Failed reads or probes of a peer", ["peer"], registry=r)
        self._seen: dict[str, int] = {}
        self._server: WSGIServer | None = None

    def serve(self, s: MetricsSettings) -> None:
        """Listen on s.address:s.port (only there) when enabled."""
        if not s.enabled:
            return
        try:
            self._server, _ = start_http_server(s.port, s.address, registry=self.registry)
        except OSError as e:
            raise ConfigError(f"key 'daemon.metrics': cannot listen on {s.address}:{s.port}: "
                              f"{e.strerror or e}") from None

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def round(self, action: str, loads: Iterable[HostLoad], errors: Mapping[str, int]) -> None:
        self.rounds.inc()
        self.decisions.labels(action).inc()
        for h in loads:
            self.load.labels(h.host).set(h.loadavg[0] / h.cpu_capacity if h.cpu_capacity else 0.0)
            self.util.labels(h.host).set(h.cpu_util)
        # The sources count failures since they started; the counters take the increase.
        for who, n in errors.items():
            new = n - self._seen.get(who, 0)
            if new > 0:
                (self.registry_errors if who == "registry" else self.peer_errors.labels(who)).inc(new)
            self._seen[who] = n

    def migration(self, outcome: str, strategy: str, total_s: float | None = None,
                  downtime_s: float | None = None, moved: int = 0) -> None:
        self.migrations.labels(outcome, strategy).inc()
        if total_s is not None:
            self.total.observe(total_s)
        if downtime_s is not None:
            self.downtime.observe(downtime_s)
        self.bytes.inc(moved)
