"""Configuration: one YAML file (/etc/migrd/migrd.yaml, or $MIGRD_CONFIG) read into frozen
dataclasses. The dataclasses are the schema: every field's type and default is checked, unknown
keys are refused, and every error names the key path and the line it is on.

A cluster config written by `migrctl bed up` uses exactly this format, so the embedded bed and a
real deployment share one code path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from migrd.errors import ConfigError
from migrd.model import PolicyConfig

#: libyaml's parser when PyYAML has it: linear in nesting depth and bounded (1000 levels), where
#: the pure-Python one takes seconds on a few thousand nested brackets before a RecursionError.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
DEFAULT_PATH = Path("/etc/migrd/migrd.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/migrd")


@dataclass(frozen=True)
class HostEntry:
    """One peer host in the cluster."""

    name: str
    address: str
    port: int = 22
    user: str = "root"
    #: known_hosts lines for this host ("ADDR KEYTYPE BASE64"); checked strictly.
    host_keys: tuple[str, ...] = ()


@dataclass(frozen=True)
class SshSettings:
    client_key: Path = Path("/etc/migrd/id_ed25519")
    connect_timeout: float = 5.0
    op_timeout: float = 120.0
    #: Wire compression of image streams: "none" or "zstd". zstd level 1 measured 1.2-1.6x the
    #: rate of none on half-zero page images with less CPU; on all-random ones about equal.
    compression: Literal["none", "zstd"] = "zstd"
    #: How to start migrctl on a peer (argv prefix); the bed uses (python, "-m", "migrd.cli").
    remote_migrctl: tuple[str, ...] = ("migrctl",)


@dataclass(frozen=True)
class CriuSettings:
    #: Path of a criu binary or wrapper; empty means: search (see migrd.adapters.criu.find_criu).
    path: Path | None = None
    #: Network lock method: nftables needs no binary (CRIU links libnftables); iptables needs
    #: iptables-restore on the host.
    network_lock: Literal["nftables", "iptables"] = "nftables"
    #: Seconds a dump waits for another CRIU dump on this host to finish (one at a time: two
    #: can collide on CRIU's proc.crtools directory).
    dump_lock_timeout: float = 120.0


@dataclass(frozen=True)
class MigrateSettings:
    """Which processes may be migrated (opt-in: everything else is refused) and safety margins.

    Workloads started with `migrctl run` are always allowed."""

    #: User names whose processes may migrate.
    allow_users: tuple[str, ...] = ()
    #: Regular expressions; a process whose command line (joined by spaces) matches one may.
    allow_commands: tuple[str, ...] = ()
    #: Cgroup path prefixes (as in /proc/PID/cgroup, e.g. /system.slice/batch.service).
    allow_cgroups: tuple[str, ...] = ()
    #: Seconds a restore waits for the dumped PIDs to be free (zombies are reaped lazily).
    pid_wait: float = 15.0
    #: Post-copy: seconds after the switch within which every page must have reached the target.
    lazy_timeout: float = 300.0
    #: The target must have this multiple of the process's RSS free in memory and on disk.
    headroom: float = 1.2
    #: How memory moves, in order of preference: a migration runs the first strategy that can
    #: move the process (`migrctl migrate --strategy` pins one). stream-copy sends the pages
    #: during the dump and needs a workload in its own PID namespace (`migrctl run`) moved
    #: without --tcp-established; stop-copy dumps to disk first and moves anything.
    strategies: tuple[Literal["stream-copy", "stop-copy", "postcopy", "precopy", "hybrid", "auto"], ...] = (
        "stream-copy", "stop-copy")
    #: Seconds a workload may be frozen: pre-copy switches once its predicted freeze meets this,
    #: and `auto` prefers the strategies whose estimated freeze does.
    downtime_target: float = 0.5
    #: Pre-copy: rounds while the workload runs at most (the first, full one included; at
    #: most 64).
    precopy_rounds: int = 8
    #: Pre-copy: how rounds find the pages that changed. criu: CRIU's own pre-dumps, which need
    #: a kernel with soft-dirty tracking (`migrctl check` says); content: read the memory and
    #: compare it page by page (any kernel); auto: criu where the kernel has soft-dirty.
    dirty_tracking: Literal["auto", "criu", "content"] = "auto"
    #: Pre-copy: when its rounds end. migrd: its own rule (the predicted freeze, divergence,
    #: convergence, the forecast gain of another round, rounds no longer shrinking,
    #: precopy_rounds); phaul and lxd: P.Haul's and LXD's rules, to measure against it
    #: (bench/strategies.py). The forecasts of `auto` and of the policy assume migrd's.
    precopy_stop_rule: Literal["migrd", "phaul", "lxd"] = "migrd"


@dataclass(frozen=True)
class EtcdSettings:
    """The etcd load registry (daemon.registry: etcd)."""

    #: Client URLs of the etcd members (http://ADDR:PORT); the next one is tried when one fails.
    endpoints: tuple[str, ...] = ("http://127.0.0.1:2379",)
    #: Seconds this host's keys outlive its agent: a dead agent's host drops out of target
    #: choice within this time. Kept alive every ttl/3 seconds.
    ttl: int = 10
    #: Migrations a target may be receiving at once, from all sources together.
    target_slots: int = 1
    #: Every key migrd writes starts with this.
    prefix: str = "/migrd/"
    #: Seconds to wait for an answer from etcd.
    timeout: float = 2.0


@dataclass(frozen=True)
class MetricsSettings:
    """The agent's Prometheus endpoint (http://ADDRESS:PORT/metrics)."""

    enabled: bool = False
    #: Address the endpoint listens on (only this one).
    address: str = "127.0.0.1"
    port: int = 9750


@dataclass(frozen=True)
class DirtyRateSettings:
    """How the agent measures its candidates' dirty rates (migrd/core/dirtyrate.py): a strided
    sample of each one's pages, read in two rounds and compared, only while the host is busy
    enough that the policy may move something."""

    enabled: bool = True
    #: Seconds one round may spend reading memory (a read that would pass it is abandoned).
    budget_s: float = 0.05
    #: Bytes of memory one round may read.
    budget_bytes: int = 16 << 20
    #: Pages read of one candidate each time (every Nth page, N from its size).
    pages: int = 1024
    #: Seconds between two measurements of one candidate.
    every: float = 30.0


@dataclass(frozen=True)
class DaemonSettings:
    """The agent loop (`migrd`): how often it looks, how it measures, how it talks."""

    #: Seconds between two rounds (sample, exchange, decide, maybe act).
    interval: float = 5.0
    #: "system" (/proc of a whole machine) or "cgroup" (the cgroup dirs below; the bed's hosts).
    load_source: str = "system"
    #: Cgroup directories of this host (load_source cgroup), one per hierarchy.
    cgroup_dirs: tuple[Path, ...] = ()
    #: Relative speed of one CPU of this host (1.0 = reference), reported to peers.
    cpu_speed: float = 1.0
    #: The admin API's unix socket (root only).
    socket: Path = Path("/run/migrd/migrd.sock")
    #: offload (push work away when overloaded), fill (never push on its own: an idle host
    #: asks the busiest overloaded peer, which then pushes to it) or consolidate (pack work
    #: onto busier peers when lightly loaded).
    mode: str = "offload"
    #: A peer's snapshot older than this (seconds) is ignored.
    peer_stale_after: float = 20.0
    #: Whose load a round reads (not the link probe below): all (every peer), fingers (a Chord
    #: finger set over a hash ring of the host names, ~log2 N peers, the same every round) or
    #: random[:D] (D peers drawn afresh each round, default ceil(log2 N)). migrd.core.peerset.
    probe: str = "all"
    #: Seconds between two link probes (RTT + a small bulk write) of each peer.
    probe_every: float = 300.0
    #: Bytes of the bulk write of a link probe.
    probe_bytes: int = 4 << 20
    #: The decisions log (state_dir/decisions.jsonl) keeps at most this many records.
    max_decisions_log: int = 2000
    #: How the agent's moves run, in order of preference: the first that can move the chosen
    #: process or container (a container moves with stop-copy). auto measures the link and the
    #: workload's dirty rate and runs the strategy whose freeze meets migrate.downtime_target.
    strategies: tuple[Literal["auto", "stream-copy", "stop-copy", "postcopy", "precopy", "hybrid"], ...] = (
        "auto", "stop-copy")
    #: Where agents find each other's load: ssh (read each peer's snapshot over SFTP) or etcd
    #: (agents publish to etcd under leases and reserve targets there; see `etcd`).
    registry: Literal["ssh", "etcd"] = "ssh"
    etcd: EtcdSettings = field(default_factory=EtcdSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    dirty_rate: DirtyRateSettings = field(default_factory=DirtyRateSettings)


@dataclass(frozen=True)
class Config:
    #: Name of this host in `hosts` (None: not part of a cluster, e.g. a single-host demo).
    host: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    hosts: tuple[HostEntry, ...] = ()
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    ssh: SshSettings = field(default_factory=SshSettings)
    criu: CriuSettings = field(default_factory=CriuSettings)
    migrate: MigrateSettings = field(default_factory=MigrateSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    #: Where this config came from (not a YAML key).
    source: Path | None = field(default=None, metadata={"yaml": False})

    def peer(self, name: str) -> HostEntry:
        for h in self.hosts:
            if h.name == name:
                return h
        known = ", ".join(h.name for h in self.hosts) or "none configured"
        from migrd.errors import InputError

        raise InputError(f"unknown host {name!r} (known hosts: {known})")


def config_path() -> Path:
    return Path(os.environ.get("MIGRD_CONFIG", DEFAULT_PATH))


def load(path: Path | None = None) -> Config:
    """Load the config; a missing default file means all defaults, a missing explicit one is
    an error."""
    explicit = path is not None or "MIGRD_CONFIG" in os.environ
    path = path or config_path()
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start})") from None
    except FileNotFoundError:
        if explicit:
            raise ConfigError(f"config file {path} does not exist") from None
        return Config()
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    return dataclasses.replace(parse(text, str(path)), source=path)


def parse(text: str, name: str = "<config>") -> Config:
    try:
        node = yaml.compose(text, Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name}:{_line(e)} not valid YAML: {_problem(e)}") from None
    except RecursionError:
        raise ConfigError(f"{name}: not valid YAML: nested too deeply") from None  # pure-Python parser
    if node is None:
        return Config()
    return _build(Config, node, name, "")


def dump(cfg: Config) -> str:
    """Serialise a Config back to YAML (used by the bed to write cluster configs)."""
    return yaml.safe_dump(_plain(cfg), sort_keys=False)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {
            f.name: _plain(getattr(value, f.name))
            for f in dataclasses.fields(value)
            if f.metadata.get("yaml", True)
        }
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _line(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    return f" line {mark.line + 1}:" if mark else ""


def _problem(e: yaml.YAMLError) -> str:
    """PyYAML's own words, on one line (a ReaderError has no `problem` and spans lines)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


#: Settings that are durations or periods: zero or less would spin or never wait.
_POSITIVE = {"ssh.connect_timeout", "ssh.op_timeout", "migrate.pid_wait", "migrate.lazy_timeout",
             "migrate.downtime_target", "migrate.precopy_rounds", "daemon.interval",
             "daemon.peer_stale_after", "daemon.probe_every", "daemon.probe_bytes",
             "daemon.max_decisions_log", "daemon.cpu_speed", "migrate.headroom", "criu.dump_lock_timeout"}


def _check_range(name: str, path: str, node: yaml.Node, value: Any) -> None:
    """Ranges the types alone do not say: numbers are finite and not negative, durations
    positive, ports 1-65535, state_dir a non-empty absolute path."""
    def bad(why: str) -> ConfigError:
        return ConfigError(f"{_where(name, path, node)}: {why}, got {value!r}")

    if isinstance(value, float) and not math.isfinite(value):
        raise bad("expected a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if path.endswith(".port") and not 1 <= value <= 65535:
            raise bad("expected a port number 1-65535")
        if value < 0:
            raise bad("expected a number of at least 0")
        if path in _POSITIVE and value <= 0:
            raise bad("expected a number greater than 0")
        if path == "migrate.precopy_rounds" and value > 64:
            # A CRIU pre-dump chain this long is refused by the target (manifest.MAX_PARENTS).
            raise bad("expected at most 64 rounds")
    if path == "state_dir" and not (isinstance(value, str) and value.startswith("/")):
        raise bad("expected an absolute path (a string starting with /)")


def _where(name: str, key: str, node: yaml.Node) -> str:
    shown = key if key.isprintable() else repr(key)[1:-1]  # a quoted key may hold a newline
    return f"{name}: key '{shown}' (line {node.start_mark.line + 1})"


def _key(node: yaml.Node, name: str, prefix: str) -> str:
    core = node.tag.startswith("tag:yaml.org,2002:") and "python/" not in node.tag
    if not isinstance(node, yaml.ScalarNode) or not core:
        raise ConfigError(f"{_where(name, prefix or '<top>', node)}: a key must be a plain name, "
                          f"not a list, mapping or tagged value")
    return node.value


def _scalar(node: yaml.ScalarNode, name: str, path: str) -> Any:
    """The scalar's value by YAML's safe rules; a tag those rules do not know (`!foo`,
    `!!python/...`), a malformed explicitly tagged value (`!!timestamp 2000`) or a number
    Python refuses to convert is the key's error."""
    try:
        return yaml.load(yaml.serialize(node), Loader=_LOADER)
    except yaml.YAMLError as e:
        raise ConfigError(f"{_where(name, path, node)}: {_problem(e)}") from None
    except Exception as e:  # PyYAML's constructors fail on such values with whatever they hit
        raise ConfigError(f"{_where(name, path, node)}: not a usable value "
                          f"({str(e).split(':')[0] or type(e).__name__})") from None


def _build(cls: type, node: yaml.Node, name: str, prefix: str) -> Any:
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{_where(name, prefix or '<top>', node)}: expected a mapping")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("yaml", True)}
    values: dict[str, Any] = {}
    for knode, vnode in node.value:
        key = _key(knode, name, prefix)
        path = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            allowed = ", ".join(fields)
            raise ConfigError(f"{_where(name, path, knode)}: unknown key (allowed here: {allowed})")
        values[key] = _convert(hints[key], vnode, name, path)
    missing = [
        f for f in fields.values()
        if f.name not in values and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError(
            f"{_where(name, prefix or '<top>', node)}: missing required key '{missing[0].name}'"
        )
    return cls(**values)


def _convert(tp: Any, node: yaml.Node, name: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(":null"):
            return None
        return _convert(args[0], node, name, path)
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):  # is_dataclass is true of instances too
        return _build(tp, node, name, path)
    if origin is tuple:
        if not isinstance(node, yaml.SequenceNode):
            raise ConfigError(f"{_where(name, path, node)}: expected a list")
        item = typing.get_args(tp)[0]
        return tuple(_convert(item, n, name, f"{path}[{i}]") for i, n in enumerate(node.value))
    if origin is dict:
        if not isinstance(node, yaml.MappingNode):
            raise ConfigError(f"{_where(name, path, node)}: expected a mapping")
        vt = typing.get_args(tp)[1]
        return {(key := _key(k, name, path)): _convert(vt, v, name, f"{path}.{key}") for k, v in node.value}
    if not isinstance(node, yaml.ScalarNode):
        raise ConfigError(f"{_where(name, path, node)}: expected a single value")
    value = _scalar(node, name, path)
    _check_range(name, path, node, value)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{_where(name, path, node)}: expected one of "
                              f"{', '.join(map(str, choices))}, got {value!r}")
        return value
    want = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
            Path: "a path"}[tp]
    ok = (
        (tp is bool and isinstance(value, bool))
        or (tp is int and isinstance(value, int) and not isinstance(value, bool))
        or (tp is float and isinstance(value, (int, float)) and not isinstance(value, bool))
        or (tp in (str, Path) and isinstance(value, (str, int, float)) and not isinstance(value, bool))
    )
    if not ok:
        raise ConfigError(f"{_where(name, path, node)}: expected {want}, got {value!r}")
    if tp is Path:
        return Path(str(value))
    return tp(value)
