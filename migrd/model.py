"""The ground floor: plain data types shared by the pure core, the engine, the agent and the
simulator. Frozen dataclasses and enums only; nothing here does I/O or imports a module that
does, so a remote `migrctl peer` step and the simulator can use them without paramiko, psutil,
the policy or the cost model."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, NamedTuple


# --------------------------------------------------------------------------- Load snapshots (what agents exchange)


@dataclass(frozen=True)
class Pressure:
    """Pressure stall information: % of the last 10 s some/all tasks waited for a resource."""

    some_avg10: float
    #: None where the kernel reports no "full" line (system-wide cpu before Linux 5.13).
    full_avg10: float | None = None


@dataclass(frozen=True)
class HostLoad:
    """One host's load at one instant. Rates are averages since the previous sample."""

    host: str
    #: Wall-clock time of the sample (epoch seconds): comparable between hosts.
    time: float
    #: "system" (a whole machine) or "cgroup" (a bed host).
    source: str
    #: Logical CPUs visible to the host.
    cpus: int
    #: CPUs' worth of processing the host may use: `cpus`, or less under a cgroup CPU quota.
    cpu_capacity: float
    #: Relative speed of one CPU (1.0 = reference); configured per host, not measured.
    cpu_speed: float
    #: 1, 5, 15 minute load averages (runnable + uninterruptible tasks). For a cgroup source the
    #: kernel keeps none, so the source computes the same exponential average of its runnable
    #: count (`decay_loadavg`), starting from the mean of a few counts over its first interval.
    loadavg: tuple[float, float, float]
    #: Busy fraction of `cpu_capacity`, 0..1.
    cpu_util: float
    #: Tasks runnable right now (procs_running, or tasks in state R in the cgroup).
    run_queue: int
    mem_total: int
    mem_available: int
    cpu_pressure: Pressure | None = None
    memory_pressure: Pressure | None = None
    io_pressure: Pressure | None = None
    #: Network throughput, received + sent, all interfaces but loopback, bytes/s.
    net_bytes_per_s: float = 0.0

    @property
    def load_per_cpu(self) -> tuple[float, float, float]:
        return tuple(x / self.cpu_capacity for x in self.loadavg)  # type: ignore[return-value]

    @property
    def power(self) -> float:
        """Processing power in reference-CPU units: capacity x per-CPU speed."""
        return self.cpu_capacity * self.cpu_speed

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ProcessLoad:
    """One process at one instant."""

    pid: int
    name: str
    cmdline: tuple[str, ...]
    user: str
    #: CPUs used on average since the previous sample (1.0 = one CPU fully busy).
    cpu_share: float
    #: CPU time used since the process started (user + system), seconds.
    cpu_seconds: float
    rss_bytes: int
    age_s: float
    #: Storage I/O rates (bytes/s); None where /proc/PID/io is not readable.
    read_bytes_per_s: float | None
    write_bytes_per_s: float | None
    #: Total size of the regular files it has open (what would have to travel with it).
    open_file_bytes: int
    #: Size of its executable (the code a restart elsewhere needs), 0 if unreadable.
    exe_bytes: int
    listen_ports: tuple[int, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

# --------------------------------------------------------------------------- Cost model inputs and outputs


class Action(str, Enum):
    STAY = "stay"
    MIGRATE = "migrate"
    MIGRATE_WITH_DATA = "migrate_with_data"
    MOVE_CODE_TO_DATA = "move_code_to_data"
    RESTART_ELSEWHERE = "restart_elsewhere"


@dataclass(frozen=True)
class Link:
    """The transport's probe of the path to a peer."""

    rtt_s: float
    #: bytes/s
    bandwidth: float

    def send_s(self, nbytes: int) -> float:
        return self.rtt_s + nbytes / self.bandwidth


@dataclass(frozen=True)
class Site:
    """A host reduced to what the cost model needs."""

    host: str
    capacity: float
    #: CPUs' worth of runnable work on it now.
    demand: float
    speed: float
    cpu_price: float


class Work(NamedTuple):
    """What is left of one process, as seen on its current host. A NamedTuple (immutable like
    the dataclasses here, a third of their construction time): the policy prices every
    candidate of a busy host every round."""

    #: Expected remaining life (wall seconds at the current host's pace).
    remaining_s: float
    #: Wall seconds already run (redone after a restart).
    done_s: float
    #: CPUs it would use uncontended (measured share / the share its host gives).
    wants: float
    #: Fraction of its wall time spent computing, 0..1.
    busy: float
    #: Reference CPU-seconds still to do / already done (CPU-seconds x host speed).
    cpu_s: float
    done_cpu_s: float


@dataclass(frozen=True)
class Estimate:
    """The numbers behind one option, compared with staying."""

    transfer_bytes: int
    transfer_s: float
    transfer_cost: float
    #: Expected remaining life R (seconds).
    remaining_s: float
    #: Expected completion time and money if the process stays (remote data reads included).
    here_s: float
    here_cost: float
    #: The same with the move, transfer included.
    there_s: float
    there_cost: float
    #: Effective speed there / here for this process (>1: faster there).
    speedup: float
    stay_score: float
    move_score: float
    #: stay_score - move_score, cost units; positive means the move pays.
    gain: float
    #: The strategy the move is priced with (the one `auto` would pick; None: a restart).
    strategy: str | None = None
    #: Seconds the process stands still: the strategy's freeze, or the whole restart.
    downtime_s: float = 0.0
    #: Every strategy's forecast, one line each (migrd/core/choice.py), for `explain`.
    forecasts: tuple[str, ...] = ()

# --------------------------------------------------------------------------- Policy inputs and outputs


class Mode(str, Enum):
    #: Sender-initiated: this busy host pushes work away.
    OFFLOAD = "offload"
    #: Receiver-initiated: an idle peer (the requester) asked this host for work.
    FILL = "fill"
    #: Pack work onto fewer hosts so this lightly loaded one can idle.
    CONSOLIDATE = "consolidate"


class Level(str, Enum):
    LOW = "low"
    NORMAL = "normal"
    HIGH = "high"


@dataclass(frozen=True)
class Watermarks:
    """Enter HIGH at or above `high`, LOW at or below `low`; in between nothing triggers."""

    high: float
    low: float

    @functools.cached_property
    def text(self) -> str:
        """For reasons; every round states the marks (cached on the instance: not a field)."""
        return f"(low {self.low:g}, high {self.high:g})"


@dataclass(frozen=True)
class MoveRates:
    """Bytes per second of the local work a move does, and its fixed cost (the strategies'
    forecasts, migrd/core/choice.py)."""

    #: CRIU writing the dumped memory.
    dump: float = 400e6
    #: CRIU reading it back into a restored process.
    restore: float = 800e6
    #: Reading and comparing the running workload's memory (pre-copy's rounds).
    scan: float = 500e6
    #: Seconds of a freeze that do not grow with memory: CRIU's start, the switch, the restore's start.
    overhead: float = 0.15


@dataclass(frozen=True)
class PolicyConfig:
    """Policy knobs (YAML section `policy`). Costs are in abstract "cost units"."""

    # -- when
    #: Load average (1 min) per CPU of capacity.
    load: Watermarks = Watermarks(high=1.0, low=0.5)
    #: CPU utilization of the capacity, 0..1.
    util: Watermarks = Watermarks(high=0.9, low=0.3)
    #: Runnable tasks per CPU of capacity.
    run_queue: Watermarks = Watermarks(high=1.5, low=0.5)
    #: A level is entered only after its condition held this long (seconds).
    hold_s: float = 30.0
    #: Minimum time between two moves decided by one host. Three rounds at the default interval:
    #: a move shows in the target's snapshot (utilization, run queue) before this host decides
    #: again. Longer costs balance: docs/sim.md, "What limits migrd".
    host_cooldown_s: float = 15.0
    #: A process that moved is not moved again for this long.
    process_cooldown_s: float = 300.0
    # -- which
    #: Younger processes are expected to end soon (remaining life ~ age): never moved.
    min_age_s: float = 5.0
    # -- where
    #: Memory a target must still have available after taking the process.
    min_free_memory: int = 64 << 20
    #: Consolidate packs a target up to this load per CPU, no further.
    consolidate_ceiling: float = 0.7
    # -- cost model (see costmodel.py)
    #: Cost units per second of a process's expected completion time.
    time_value: float = 1.0
    #: Cost units per byte sent over the network.
    byte_cost: float = 0.0
    #: Cost units per CPU-second, per host; hosts not listed cost `default_cpu_second_cost`.
    cpu_second_cost: dict[str, float] = field(default_factory=dict)
    default_cpu_second_cost: float = 0.0
    #: How fast this cluster's hosts dump, compare and restore memory, and the freeze a move
    #: costs whatever its size; sending it comes on top, per strategy (migrd/core/choice.py).
    move_rates: MoveRates = MoveRates()
    #: The strategies a move is priced with: the policy prices the one `--strategy auto` would
    #: pick among them. stop-copy and precopy move any process; stream-copy and postcopy only
    #: `migrctl run` workloads, so they are not assumed.
    strategies: tuple[Literal["stop-copy", "stream-copy", "postcopy", "precopy"], ...] = ("stop-copy", "precopy")
    #: Seconds a workload may be frozen: the agent sets it from migrate.downtime_target.
    downtime_target: float = field(default=0.5, metadata={"yaml": False})
    #: Pre-copy's round limit: the agent sets it from migrate.precopy_rounds.
    precopy_rounds: int = field(default=8, metadata={"yaml": False})
    #: Expected remaining life is capped here (a week-old daemon is not "a week more" of work
    #: worth planning around).
    max_horizon_s: float = 86400.0
    #: A move must gain at least this much (cost units) ...
    min_gain: float = 5.0
    #: ... and at least this fraction of what staying costs.
    min_gain_ratio: float = 0.1
    #: Consolidate accepts a move that costs the process at most this fraction more.
    consolidate_max_loss_ratio: float = 0.05
    # -- security
    #: Sensitivity label -> hosts cleared to hold data (or images) of processes with that label.
    #: A label with no entry may not leave its host; processes without a label go anywhere.
    clearance: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def cpu_price(self, host: str) -> float:
        return self.cpu_second_cost.get(host, self.default_cpu_second_cost)

    def cleared(self, label: str | None, host: str) -> bool:
        return label is None or host in self.clearance.get(label, ())


@dataclass(frozen=True)
class Peer:
    """Another host as this host sees it: its latest snapshot and the link to it."""

    load: HostLoad
    link: Link
    #: This host's CPU features are a subset of the peer's (criu cpuinfo check passed).
    cpu_compatible: bool = True


@dataclass(frozen=True)
class SubjectRef:
    """What a candidate is, as the engine moves it: a kind of migrd.engine.subjects.SUBJECTS
    (a process tree, a container of a runtime) and, for a container, its name. The policy
    prices every kind alike; the agent hands the ref to the engine, which finds the subject by it."""

    kind: str = "process"
    #: The container's name; None for a process tree (found by its PID).
    name: str | None = None
    #: Its data are its open files, which travel only when the move takes them (with_files);
    #: a container's data are its rootfs changes, which always travel with it.
    open_files: bool = True
    #: The only strategies that can move it (None: any the policy prices).
    strategies: tuple[str, ...] | None = None

    def label(self, pid: int | None, proc_name: str | None) -> str:
        """How decisions and explanations name it."""
        if self.name is None:
            return f"PID {pid} ({proc_name})"
        return f"container {self.name} ({self.kind}, init PID {pid})"


#: The subject of a plain process candidate.
PROCESS_TREE = SubjectRef()
#: A container is checkpointed by its runtime, which dumps to disk: stop-and-copy only.
CONTAINER_STRATEGIES = ("stop-copy",)


@dataclass(frozen=True)
class Candidate:
    """A process tree or a container on this host that the policy may consider moving. For a
    container `proc` describes the whole container: its init's PID, command, user and age, its
    cgroup's CPU and memory; its rootfs changes are its data (`data_bytes`)."""

    proc: ProcessLoad
    opted_in: bool = False
    #: When it last migrated, or (on an agent) a move of it last failed (epoch seconds); None
    #: if never.
    last_migrated: float | None = None
    #: Bytes of data it works on; None: its open regular files (`proc.open_file_bytes`).
    data_bytes: int | None = None
    #: Where that data lives; None: on this host (it must travel with the process).
    data_host: str | None = None
    #: Sensitivity label of its data (see PolicyConfig.clearance).
    data_label: str | None = None
    #: It may be killed and started afresh elsewhere (weak mobility): only code travels.
    restartable: bool = False
    #: Bytes of code a restart needs; None: the executable's size (`proc.exe_bytes`).
    code_bytes: int | None = None
    #: Bytes per second it rewrites its memory, as the agent sampled it (migrd/core/dirtyrate.py);
    #: None: not measured (priced as 0).
    dirty_rate: float | None = None
    subject: SubjectRef = PROCESS_TREE

    @property
    def data_size(self) -> int:
        return self.proc.open_file_bytes if self.data_bytes is None else self.data_bytes

    @property
    def code_size(self) -> int:
        return self.proc.exe_bytes if self.code_bytes is None else self.code_bytes


@dataclass(frozen=True)
class Situation:
    """Everything `decide` looks at."""

    now: float
    #: This host's snapshots, oldest first; the last one is "now".
    history: tuple[HostLoad, ...]
    peers: Sequence[Peer] = ()
    candidates: Sequence[Candidate] = ()
    mode: Mode = Mode.OFFLOAD
    #: The level the previous decision reported (hysteresis).
    previous_level: Level = Level.NORMAL
    #: When this host last decided a move (host cooldown), None if never.
    last_move_at: float | None = None
    #: Fill mode: the idle peer that asked this host for work.
    requester: str | None = None


@dataclass(frozen=True)
class Decision:
    action: Action
    mode: Mode
    #: This host's level; pass it back as Situation.previous_level next time.
    level: Level
    source: str
    pid: int | None = None
    name: str | None = None
    target: str | None = None
    #: What moves (a process tree or a container); None for stay.
    subject: SubjectRef | None = None
    #: The numbers behind a move; for `stay`, those of the best rejected move if any.
    estimate: Estimate | None = None
    reasons: tuple[str, ...] = ()

# --------------------------------------------------------------------------- Process descriptions (what a checkpoint's manifest records)


@dataclass(frozen=True)
class FileIdentity:
    """What makes an open file recognisable as the very same file from another host that
    shares its storage: its filesystem's ID (statfs f_fsid; NFS clients report the server's)
    and inode number, plus a digest of its first and last bytes up to `size` (a file that
    only grew since keeps those bytes)."""

    fsid: int
    inode: int
    size: int
    digest: str


@dataclass(frozen=True)
class OpenFile:
    path: str
    fd: int
    mode: str
    size: int | None
    identity: FileIdentity | None = None


@dataclass(frozen=True)
class Listener:
    family: str  # "inet" or "inet6"
    address: str
    port: int


@dataclass(frozen=True)
class Connection:
    """An established TCP connection of the process."""

    local_address: str
    local_port: int
    remote_address: str
    remote_port: int

    @property
    def name(self) -> str:
        return f"{self.local_address}:{self.local_port} -> {self.remote_address}:{self.remote_port}"


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    cmdline: tuple[str, ...]
    exe: str
    cwd: str
    uid: int
    rss: int
    start_time: float
    open_files: tuple[OpenFile, ...] = ()
    listening: tuple[Listener, ...] = ()
    #: True when the process is its own session leader; otherwise CRIU needs --shell-job.
    session_leader: bool = False
    #: True when the process is the init of its own PID namespace (no PID clash on restore).
    own_pid_namespace: bool = False
    #: Every PID and thread ID in the dumped tree: a plain restore needs all of them free.
    tree_ids: tuple[int, ...] = ()
    environ: dict[str, str] = field(default_factory=dict)
    #: Established TCP connections of the root process.
    established: tuple[Connection, ...] = ()
    #: Device nodes it has open (/dev/null, a tty, ...), every process of the tree.
    devices: tuple[str, ...] = ()



@dataclass(frozen=True)
class ContainerInfo:
    """A container as migrd moves it: the runtime's name for it, its bundle and the image its
    rootfs started from (found on the target by content, never copied)."""

    name: str
    runtime: str
    image: str
    #: sha256 over the image tree's listing and contents (migrd.engine.containers.image_digest).
    image_digest: str
    bundle: str
    #: The bundle's config.json as the container runs it (it travels with the images).
    config: dict[str, Any]
    #: The annotation (runc) or label (Podman) io.migrd.migratable=true is set.
    migratable: bool = False
    #: The runtime's ID of the image (Podman: restoring an exported checkpoint needs it there).
    image_id: str = ""
