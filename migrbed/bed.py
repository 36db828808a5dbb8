"""The embedded test bed: N "hosts" on one Linux machine that look to migrd exactly like real
ones. Each host has its own network namespace (eth0 = 198.18.0.i/24 on a private bridge that
lives in a namespace of its own), its own mount namespace in which /etc/migrd, /var/lib/migrd
and /srv/migrd are that host's private directories, its own cgroup, and a real sshd on
198.18.0.i:22. Its /etc/migrd/migrd.yaml is an ordinary config, so code run in a bed host
takes the same paths it takes on a real one.

Nothing is added to the root network namespace: veth pairs are created directly inside the
bridge and host namespaces, and no namespace has a route beyond 198.18.0.0/24.

Crash safety: `up` writes the whole plan (every name it will create) to the state file before
creating anything, then adds each PID (with its start time and boot id) as soon as it exists; every
process it starts is inside a host cgroup from its first instruction. So `down` can always
finish the job from the state file: it kills recorded PIDs whose start time still matches, then
everything left in the host cgroups, then deletes namespaces, cgroups and files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeGuard

from migrd.adapters import cgroup, private, command
from migrbed import etcdserver, sshd
from migrd.config import Config, DaemonSettings, HostEntry, SshSettings, dump, parse
from migrd.errors import CommandError, InputError, MigrdError, NotPermitted

DEFAULT_ROOT = Path("/var/lib/migrd/bed")
#: sshd's files must have the same path inside a host and in the root mount namespace (sshd
#: is checked with `sshd -t` from outside, then runs inside). The bed root may be hidden inside
#: a host (the default one is under /var/lib/migrd), /run never is.
RUN_ROOT = Path("/run/migrd/bed")
NETNS_DIR = Path("/run/netns")
SUBNET = "198.18.0"
MAX_HOSTS = 64
SSH_PORT = 22
#: Host-private directory (under the host's backing dir) -> where the host sees it. Bound in
#: this order: /var/lib/migrd last, because the default bed root lives below it.
HOST_MOUNTS = (("etc", Path("/etc/migrd")), ("srv", Path("/srv/migrd")), ("state", Path("/var/lib/migrd")))
HOST_CLIENT_KEY = Path("/etc/migrd/id_ed25519")
HOST_CONFIG = Path("/etc/migrd/migrd.yaml")
HOST_AGENT_SOCKET = Path("/var/lib/migrd/migrd.sock")
log = logging.getLogger(__name__)
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,23}")


@dataclass(frozen=True)
class ProcRef:
    """A process we started. start is /proc/PID/stat's starttime (clock ticks after boot) and
    boot the kernel's boot_id: a recycled PID, or one after a reboot, does not match, so we
    never signal a stranger."""

    pid: int
    start: int
    boot: str


@dataclass(frozen=True)
class HostState:
    name: str
    index: int
    address: str
    netns: str
    dir: Path  # backing directories etc/, state/, srv/ in the root mount namespace
    run_dir: Path  # sshd files and logs (same path inside the host)
    cgroup: cgroup.Group
    cpu_quota: float | None = None
    #: Mbit/s each way on the host's link to the bridge (None: unshaped).
    link_mbit: float | None = None
    holder: ProcRef | None = None  # keeps the host's mount namespace alive
    sshd: ProcRef | None = None

    @property
    def netns_path(self) -> Path:
        return NETNS_DIR / self.netns

    @property
    def mount_ns(self) -> Path | None:
        return Path(f"/proc/{self.holder.pid}/ns/mnt") if self.holder else None


@dataclass(frozen=True)
class BedState:
    name: str
    root: Path
    bridge_netns: str
    cgroup: cgroup.Group  # parent of the host groups
    run_dir: Path
    hosts: tuple[HostState, ...]
    config_out: Path | None = None  # extra copy of the cluster config asked for by the operator
    ready: bool = False

    @property
    def dir(self) -> Path:
        return self.root / self.name

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def client_key(self) -> Path:
        return self.dir / "id_ed25519"

    @property
    def config_file(self) -> Path:
        """The cluster-level config (host: null), usable from the root namespace."""
        return self.dir / "migrd.yaml"

    def host(self, name: str) -> HostState:
        for h in self.hosts:
            if h.name == name:
                return h
        raise InputError(f"bed {self.name!r} has no host {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")


# ---- pure core -------------------------------------------------------------------------------

def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise InputError(f"bad bed name {name!r}: use 1-24 of a-z, 0-9 and '-', starting with a letter or digit")
    return name


def new_name(prefix: str = "t") -> str:
    """A fresh bed name for a test run (parallel runs must never share one)."""
    return validate_name(prefix + secrets.token_hex(2))


def _host_values(specs: Iterable[str], top: float, bad: str) -> dict[str, float]:
    out = {}
    for spec in specs:
        host, sep, value = spec.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not sep or not host or not 0 < number <= top:
            raise InputError(f"bad {bad.format(spec=repr(spec))}")
        out[host] = number
    return out


def parse_quotas(specs: Iterable[str]) -> dict[str, float]:
    """['host2=0.5', ...] -> {'host2': 0.5}: share of one CPU."""
    return _host_values(specs, 1024, "CPU quota {spec}: expected HOST=FRACTION, e.g. host2=0.5")


#: The fastest link rate a bed host may be given (Mbit/s); unshaped veth runs at memory speed.
MAX_LINK_MBIT = 100_000


def parse_link_rates(specs: Iterable[str]) -> dict[str, float]:
    """['host2=200', ...] -> {'host2': 200.0}: Mbit/s each way on that host's link."""
    return _host_values(specs, MAX_LINK_MBIT,
                        "link rate {spec}: expected HOST=MBIT (Mbit/s each way), e.g. host2=200")


def tbf_argv(netns: str, dev: str, mbit: float) -> list[str]:
    """tc's token bucket on `dev`'s egress in `netns`, at `mbit` Mbit/s. The bucket holds 10 ms
    of traffic (at least one 64 KiB GSO packet, which veth hands over whole) and the queue up
    to 50 ms more: a link that sends at its rate, not a shaper that drops bursts."""
    bits = round(mbit * 1e6)
    burst = max(64 * 1024, bits // 8 // 100)
    return ["tc", "-n", netns, "qdisc", "replace", "dev", dev, "root", "tbf",
            "rate", f"{bits}bit", "burst", str(burst), "latency", "50ms"]


def plan(name: str, hosts: int, root: Path, layout: cgroup.Layout,
         cpu_quotas: Mapping[str, float] | None = None, config_out: Path | None = None,
         run_root: Path = RUN_ROOT, link_mbits: Mapping[str, float] | None = None) -> BedState:
    """Every name the bed will create, before anything is created."""
    validate_name(name)
    if not 1 <= hosts <= MAX_HOSTS:
        raise InputError(f"a bed has 1 to {MAX_HOSTS} hosts, not {hosts}")
    quotas = dict(cpu_quotas or {})
    rates = dict(link_mbits or {})
    names = [f"host{i}" for i in range(1, hosts + 1)]
    for what, given in (("CPU quota", quotas), ("link rate", rates)):
        unknown = sorted(set(given) - set(names))
        if unknown:
            raise InputError(f"{what} for unknown host {unknown[0]!r} (hosts: host1..host{hosts})")
    parent = cgroup.group_for(layout, f"migrd-bed-{name}")
    run_dir = run_root / name
    return BedState(
        name=name,
        root=root,
        bridge_netns=f"migrd-{name}-br",
        cgroup=parent,
        run_dir=run_dir,
        config_out=config_out,
        hosts=tuple(
            HostState(
                name=h,
                index=i,
                address=f"{SUBNET}.{i}",
                netns=f"migrd-{name}-{h}",
                dir=root / name / h,
                run_dir=run_dir / h,
                cgroup=parent.child(h),
                cpu_quota=quotas.get(h),
                link_mbit=rates.get(h),
            )
            for i, h in enumerate(names, start=1)
        ),
    )


def host_config(state: BedState, host_keys: Mapping[str, str], host: str | None) -> Config:
    """The config a bed host (or, with host=None, an operator outside) uses: the same schema
    and the same file format as a real deployment."""
    entries = tuple(
        HostEntry(h.name, h.address, SSH_PORT, "root",
                  (sshd.known_hosts_line(h.address, SSH_PORT, host_keys[h.name]),))
        for h in state.hosts
    )
    # Bed hosts run migrd from this very installation (they share its filesystem).
    remote = (sys.executable, "-m", "migrd.cli")
    if host is None:
        return Config(host=None, hosts=entries,
                      ssh=SshSettings(client_key=state.client_key, remote_migrctl=remote))
    h = state.host(host)
    # The agent measures its host's cgroup; its socket must be host-private (/run is shared).
    daemon = DaemonSettings(load_source="cgroup", cgroup_dirs=h.cgroup.dirs, socket=HOST_AGENT_SOCKET)
    return Config(host=host, state_dir=Path("/var/lib/migrd"), hosts=entries,
                  ssh=SshSettings(client_key=HOST_CLIENT_KEY, remote_migrctl=remote), daemon=daemon)


def _netns_argv(h: HostState) -> list[str]:
    return ["nsenter", f"--net={h.netns_path}"]


def _shim_argv(h: HostState, python: str) -> list[str]:
    # Joins the host cgroup and execs the rest: see migrbed.hostexec.
    return [python, "-m", "migrbed.hostexec", *map(str, h.cgroup.dirs), "--"]


def enter_argv(state: BedState, host: str, python: str = sys.executable) -> list[str]:
    """Prefix that runs a command inside host's network and mount namespaces and cgroup,
    keeping the PID it was started with. nsenter, not `ip netns exec`: the latter makes a new
    mount namespace for every command, which both hides the host's mounts and trips CRIU.
    python (with migrd importable) runs inside the host, so it must not live below the
    host-private /etc/migrd, /var/lib/migrd or /srv/migrd."""
    h = state.host(host)
    if h.mount_ns is None:
        raise MigrdError(f"bed {state.name!r} host {host} has no mount namespace yet (bed not fully up?)")
    return [*_netns_argv(h), f"--mount={h.mount_ns}", "--", *_shim_argv(h, python)]


def holder_argv(h: HostState, python: str = sys.executable) -> list[str]:
    """The mount-namespace holder: in the host's cgroup and network namespace, it unshares a
    private mount namespace and sleeps until `bed down` kills it."""
    return [*_netns_argv(h), "--", *_shim_argv(h, python),
            "unshare", "--mount", "--propagation", "private", "--", "sleep", "infinity"]


def state_to_json(state: BedState) -> dict:
    def ref(r: ProcRef | None) -> dict | None:
        return dataclasses.asdict(r) if r else None

    return {
        "format": 1,
        "name": state.name,
        "root": str(state.root),
        "bridge_netns": state.bridge_netns,
        "cgroup": state.cgroup.to_json(),
        "run_dir": str(state.run_dir),
        "config_out": str(state.config_out) if state.config_out else None,
        "ready": state.ready,
        "hosts": [
            {"name": h.name, "index": h.index, "address": h.address, "netns": h.netns,
             "dir": str(h.dir), "run_dir": str(h.run_dir), "cgroup": h.cgroup.to_json(),
             "cpu_quota": h.cpu_quota, "link_mbit": h.link_mbit, "holder": ref(h.holder),
             "sshd": ref(h.sshd)}
            for h in state.hosts
        ],
    }


def state_from_json(data: dict) -> BedState:
    def ref(r: dict | None) -> ProcRef | None:
        return ProcRef(int(r["pid"]), int(r["start"]), r["boot"]) if r else None

    return BedState(
        name=data["name"],
        root=Path(data["root"]),
        bridge_netns=data["bridge_netns"],
        cgroup=cgroup.Group.from_json(data["cgroup"]),
        run_dir=Path(data["run_dir"]),
        config_out=Path(data["config_out"]) if data.get("config_out") else None,
        ready=bool(data["ready"]),
        hosts=tuple(
            HostState(name=h["name"], index=int(h["index"]), address=h["address"], netns=h["netns"],
                      dir=Path(h["dir"]), run_dir=Path(h["run_dir"]),
                      cgroup=cgroup.Group.from_json(h["cgroup"]), cpu_quota=h["cpu_quota"],
                      link_mbit=h.get("link_mbit"), holder=ref(h["holder"]), sshd=ref(h["sshd"]))
            for h in data["hosts"]
        ),
    )


def with_host(state: BedState, name: str, **changes) -> BedState:
    hosts = tuple(dataclasses.replace(h, **changes) if h.name == name else h for h in state.hosts)
    return dataclasses.replace(state, hosts=hosts)


def listening(proc_net_tcp: str, address: str, port: int) -> bool:
    """Whether /proc/PID/net/tcp shows a listener on address:port."""
    want = (socket.inet_aton(address), port)
    for line in proc_net_tcp.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 4 or fields[3] != "0A":  # 0A = TCP_LISTEN
            continue
        ip_hex, port_hex = fields[1].split(":")
        # The kernel prints the address as a host-order integer.
        if (int(ip_hex, 16).to_bytes(4, sys.byteorder), int(port_hex, 16)) == want:
            return True
    return False


# ---- process identity ------------------------------------------------------------------------

def _stat(pid: int) -> tuple[str, int] | None:
    """(state letter, starttime) of pid, or None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text[text.rindex(")") + 2:].split()  # comm may contain spaces and ')'
    return fields[0], int(fields[19])


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def proc_ref(pid: int) -> ProcRef:
    st = _stat(pid)
    if st is None:
        raise MigrdError(f"process {pid} exited right after it was started")
    return ProcRef(pid, st[1], _boot_id())


def alive(ref: ProcRef | None) -> TypeGuard[ProcRef]:
    """ref still names the process we started, and it has not exited."""
    if ref is None or ref.boot != _boot_id():
        return False
    st = _stat(ref.pid)
    return st is not None and st[1] == ref.start and st[0] not in ("Z", "X")


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it


def stop(ref: ProcRef | None, timeout: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after timeout; only if ref still names our process."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not alive(ref):
            return
        try:
            os.kill(ref.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            _reap(ref.pid)
            if not alive(ref):
                return
            time.sleep(0.05)


# ---- state file ------------------------------------------------------------------------------

def default_root() -> Path:
    return Path(os.environ.get("MIGRD_BED_ROOT", DEFAULT_ROOT))


def load_state(name: str, root: Path | None = None) -> BedState:
    path = (root or default_root()) / validate_name(name) / "state.json"
    try:
        return state_from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise InputError(f"no bed named {name!r} (no {path}); start one with `migrctl bed up`") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"bed state file {path} is damaged ({e}); remove the bed's resources by hand") from None


def save_state(state: BedState) -> None:
    private.write_atomic(state.state_file, json.dumps(state_to_json(state), indent=2))


def _already(state: BedState) -> NotPermitted:
    return NotPermitted(f"bed {state.name!r} already exists ({state.state_file}); "
                        f"remove it first with `migrctl bed down --name {state.name}`")


def _claim(state: BedState) -> None:
    """Take the name: the state file (with the whole plan) is created exclusively, so two
    `bed up` of one name cannot both proceed; then the run dir, which is machine-wide like the
    namespace names, so a bed of the same name under another root cannot either."""
    private.private_dir(state.dir)  # the client key and the cluster config live here
    try:
        fd = private.open_private(state.state_file, os.O_WRONLY | os.O_EXCL)
    except FileExistsError:
        raise _already(state) from None
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(state_to_json(state), indent=2))
    try:
        state.run_dir.mkdir(parents=True)
    except FileExistsError:
        _release(state, run_dir=False)
        raise NotPermitted(f"bed name {state.name!r} is in use on this machine ({state.run_dir} exists: "
                           "a bed under another MIGRD_BED_ROOT?); pick another --name") from None


def _release(state: BedState, run_dir: bool = True) -> None:
    """Give the name back when nothing else was created yet."""
    if run_dir:
        state.run_dir.rmdir()
    state.state_file.unlink()
    try:
        state.dir.rmdir()
    except OSError:
        pass


# ---- up --------------------------------------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        raise NotPermitted("the bed needs root (namespaces, cgroups, sshd); run it with sudo")


def _refuse_foreign(state: BedState) -> None:
    """Never adopt (and later delete) a namespace or cgroup another bed made."""
    for ns in [state.bridge_netns, *(h.netns for h in state.hosts)]:
        if (NETNS_DIR / ns).exists():
            raise NotPermitted(f"network namespace {ns} already exists (a bed {state.name!r} under "
                               "another root?); pick another --name")
    if cgroup.exists(state.cgroup):
        raise NotPermitted(f"cgroup {state.cgroup.dirs[0]} already exists; pick another --name")


def up(name: str = "bed", hosts: int = 3, root: Path | None = None,
       cpu_quotas: Mapping[str, float] | None = None, config_out: Path | None = None,
       link_mbits: Mapping[str, float] | None = None) -> BedState:
    """Create and start a bed; refuse if one of that name exists. On failure, everything made
    so far is removed again before the error is raised."""
    _require_root()
    root = (root or default_root()).absolute()
    state = plan(name, hosts, root, cgroup.detect(), cpu_quotas, config_out, link_mbits=link_mbits)
    if state.state_file.exists():
        raise _already(state)
    _claim(state)
    try:
        _refuse_foreign(state)
    except NotPermitted:
        _release(state)
        raise
    try:
        return _build(state)
    except BaseException:
        try:
            _teardown(load_state(state.name, state.root))
        except MigrdError as e:
            log.error("%s", e)  # the original error matters more; the state file remains
        raise


def _ip(*args: str) -> None:
    command.run(["ip", *args])


def _build(state: BedState) -> BedState:
    for h in state.hosts:
        for sub, _ in HOST_MOUNTS:
            # etc holds the host's client key and config, state is its migrd state_dir; srv is
            # the workloads' data, for the tests to read and write.
            if sub == "srv":
                (h.dir / sub).mkdir(parents=True, exist_ok=True)
            else:
                private.private_dir(h.dir / sub)
        private.private_dir(h.run_dir)  # sshd's keys (sshd wants them in no group/world-writable dir)
    for _, where in HOST_MOUNTS:
        where.mkdir(parents=True, exist_ok=True)  # mount points; empty in the root namespace
    sshd.ensure_keypair(state.client_key, f"migrd-bed-{state.name}")

    cgroup.create(state.cgroup)
    for h in state.hosts:
        cgroup.create(h.cgroup)
        if h.cpu_quota is not None:
            cgroup.set_cpu_quota(h.cgroup, h.cpu_quota)

    br = state.bridge_netns
    _ip("netns", "add", br)
    _ip("-n", br, "link", "set", "lo", "up")
    _ip("-n", br, "link", "add", "br0", "type", "bridge")
    _ip("-n", br, "link", "set", "br0", "up")
    for h in state.hosts:
        _ip("netns", "add", h.netns)
        port = f"vh{h.index}"  # the bridge namespace is ours alone: short fixed names are safe
        _ip("-n", br, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", h.netns)
        _ip("-n", br, "link", "set", port, "master", "br0", "up")
        _ip("-n", h.netns, "link", "set", "lo", "up")
        _ip("-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
        _ip("-n", h.netns, "link", "set", "eth0", "up")
        if h.link_mbit is not None:  # both ways: out of the host, and out of the bridge to it
            command.run(tbf_argv(h.netns, "eth0", h.link_mbit))
            command.run(tbf_argv(br, port, h.link_mbit))

    for h in state.hosts:
        state = with_host(state, h.name, holder=_start_holder(h))
        save_state(state)
        _bind_host_dirs(state.host(h.name))

    client_pub = state.client_key.with_suffix(".pub").read_text()
    files = {}
    for h in state.hosts:
        key = h.dir / "etc" / HOST_CLIENT_KEY.name
        shutil.copyfile(state.client_key, key)
        key.chmod(0o600)
        shutil.copyfile(state.client_key.with_suffix(".pub"), key.with_suffix(".pub"))
        files[h.name] = sshd.prepare(h.run_dir / "sshd", h.address, SSH_PORT, [client_pub])
    host_keys = {n: f.host_public_key() for n, f in files.items()}
    for h in state.hosts:
        (h.dir / "etc" / HOST_CONFIG.name).write_text(dump(host_config(state, host_keys, h.name)))
    cluster = dump(host_config(state, host_keys, None))
    state.config_file.write_text(cluster)
    if state.config_out:
        state.config_out.write_text(cluster)

    for h in state.hosts:
        state = _start_sshd(state, h)
    for h in state.hosts:
        _wait_listening(h)
    state = dataclasses.replace(state, ready=True)
    save_state(state)
    return state


def _start_sshd(state: BedState, h: HostState) -> BedState:
    p = sshd.start(sshd.files_in(h.run_dir / "sshd"), prefix=enter_argv(state, h.name),
                   log_file=h.run_dir / "sshd.log")
    state = with_host(state, h.name, sshd=proc_ref(p.pid))
    save_state(state)
    return state


def restart_sshd(state: BedState, host: str) -> BedState:
    """Start host's sshd again, with the same host key and config (after it died or a test
    killed it); a still-running one is stopped first. Returns the updated state, also saved,
    so `down` stops the new sshd."""
    h = _check_usable(state, host)
    stop(h.sshd)
    state = _start_sshd(state, h)
    _wait_listening(state.host(host))
    return state


def _start_holder(h: HostState) -> ProcRef:
    """The handle on the host's mount namespace is a process living in it, used as
    nsenter --mount=/proc/HOLDER/ns/mnt. The alternative, bind-mounting the namespace file,
    needs a private-propagation mount in the root namespace: a change outside the bed that a
    crash would leave behind. A holder leaves nothing outside; it sits in the host cgroup, so
    `bed down` kills it even if its PID never reached the state file, and its recorded start
    time is checked before use. If it dies the host is unusable (exec refuses): `bed down`."""
    out = open(h.run_dir / "holder.log", "ab")
    try:
        p = command.spawn(holder_argv(h), stdout=out, stderr=out)
    finally:
        out.close()
    ref = proc_ref(p.pid)
    # Bind mounts must wait until the holder really is in its own namespace, or they would
    # land in ours: it is once it runs `sleep` (unshare execs it after unsharing).
    ours = os.readlink("/proc/self/ns/mnt")
    deadline = time.monotonic() + 20
    while True:
        try:
            comm = Path(f"/proc/{p.pid}/comm").read_text().strip()
            if comm == "sleep" and os.readlink(f"/proc/{p.pid}/ns/mnt") != ours and alive(ref):
                return ref
        except (FileNotFoundError, ProcessLookupError):
            pass
        if p.poll() is not None or time.monotonic() >= deadline:
            raise CommandError(f"mount namespace holder for {h.name} did not start; see {h.run_dir / 'holder.log'}")
        time.sleep(0.02)


def _bind_host_dirs(h: HostState) -> None:
    _own_run(h)
    for sub, where in HOST_MOUNTS:
        command.run(["nsenter", f"--mount={h.mount_ns}", "--", "mount", "--bind", str(h.dir / sub), str(where)])


def _own_run(h: HostState) -> None:
    """Give the host a tmpfs /run of its own, as systemd gives every Debian host. CRIU keeps
    its kernel probe cache (/run/criu.kdat) only on a tmpfs; without one (this machine's /run is
    not) every CRIU run probes the kernel again, and a restore does so inside the downtime.
    The root namespace's /run entries a host needs stay bound: RUN_ROOT (sshd's files) and the
    network namespaces' handles."""
    keep = " ".join(p.relative_to("/run").parts[0] for p in (RUN_ROOT, NETNS_DIR))
    # fd 3 holds the old /run once the tmpfs covers it; --no-canonicalize keeps mount from
    # turning /proc/self/fd/3/X back into /run/X, which would be the new, empty one.
    script = ('exec 3</run && mount -t tmpfs -o mode=0755,size=16m migrd-bed-run /run && '
              f'for d in {keep}; do mkdir /run/$d && '
              'mount --no-canonicalize --rbind /proc/self/fd/3/$d /run/$d || exit 1; done && '
              'mkdir -m 0755 /run/sshd && mkdir -m 1777 /run/lock && ln -s /dev/shm /run/shm')
    command.run(["nsenter", f"--mount={h.mount_ns}", "--", "sh", "-c", script])


def _wait_listening(h: HostState, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    assert h.sshd is not None
    while True:
        try:
            # /proc/PID/net/tcp shows the sockets of that process's network namespace.
            if listening(Path(f"/proc/{h.sshd.pid}/net/tcp").read_text(), h.address, SSH_PORT):
                return
        except FileNotFoundError:
            pass
        if not alive(h.sshd) or time.monotonic() >= deadline:
            raise CommandError(f"sshd of {h.name} is not listening on {h.address}:{SSH_PORT}; "
                               f"see {h.run_dir / 'sshd.log'}")
        time.sleep(0.05)


# ---- down ------------------------------------------------------------------------------------

def down(name: str = "bed", root: Path | None = None) -> bool:
    """Remove a bed from its state file; False when there was no such bed. Safe to repeat,
    and after `up` died half-way."""
    _require_root()
    try:
        state = load_state(name, root)
    except InputError:
        if not ((root or default_root()) / validate_name(name) / "state.json").exists():
            return False
        raise
    _teardown(state)
    return True


def _teardown(state: BedState) -> None:
    """Undo everything the state lists, going on past failures so one stuck piece does not
    leave the rest behind; the state file goes last, so a failed teardown can be re-run."""
    errors: list[str] = []

    def attempt(fn, *args) -> None:
        try:
            fn(*args)
        except (MigrdError, OSError) as e:
            errors.append(str(e))

    for h in state.hosts:
        attempt(_remove_containers, h)  # while the host's mount namespace still exists
        attempt(stop_agent, h)
    attempt(stop_registry, state)
    for h in state.hosts:
        attempt(stop, h.sshd)
        attempt(stop, h.holder)
    for h in state.hosts:
        attempt(cgroup.remove, h.cgroup)  # also kills whatever `bed exec` left running
    attempt(cgroup.remove, state.cgroup)
    for ns in [*(h.netns for h in state.hosts), state.bridge_netns]:
        if (NETNS_DIR / ns).exists():
            attempt(_ip, "netns", "delete", ns)
    attempt(shutil.rmtree, state.run_dir, True)
    for h in state.hosts:
        attempt(shutil.rmtree, h.dir, True)
    if errors:
        raise MigrdError(f"bed {state.name!r} not fully removed: {errors[0]} (run `migrctl bed down` again)")
    for leftover in (state.client_key, state.client_key.with_suffix(".pub"), state.config_file):
        leftover.unlink(missing_ok=True)
    state.state_file.unlink(missing_ok=True)
    try:
        state.dir.rmdir()
    except OSError:
        pass  # something we did not put there: leave it


def _remove_containers(h: HostState) -> None:
    """End the runc and Podman containers of a host: they live in cgroups of their own (the
    runtimes make them), outside the host's, so removing the host's cgroup would miss them.
    Podman's run inside the host's mount namespace (its overlay mounts are there)."""
    root = h.dir / "state" / "runc"
    runc = shutil.which("runc")
    if runc is not None and root.is_dir():
        for name in command.run([runc, "--root", str(root), "list", "-q"]).stdout.decode().split():
            command.run([runc, "--root", str(root), "delete", "--force", name], check=False)
    podman = shutil.which("podman")
    home = Path("/var/lib/migrd/podman")  # as the host sees its state_dir
    if podman is not None and (h.dir / "state" / "podman").is_dir() and alive(h.holder):
        command.run(["nsenter", f"--mount={h.mount_ns}", "--", podman, "--root", str(home / "storage"),
                     "--runroot", str(home / "run"), "--tmpdir", str(home / "tmp"), "--cgroup-manager",
                     "cgroupfs", "--events-backend", "file", "--runtime", "runc", "rm", "-a", "-f"],
                    check=False, timeout=120)


# ---- using a bed -----------------------------------------------------------------------------

def _check_usable(state: BedState, host: str) -> HostState:
    h = state.host(host)
    if not alive(h.holder):
        raise MigrdError(f"bed {state.name!r} host {host} is gone (its namespace holder exited); "
                         f"run `migrctl bed down --name {state.name}`")
    return h


def exec_in(state: BedState, host: str, argv: Sequence[str], *, check: bool = True,
            timeout: float | None = 60, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run argv to completion inside host (cgroup, network and mount namespaces)."""
    _check_usable(state, host)
    return command.run([*enter_argv(state, host), *argv], check=check, timeout=timeout, input=input)


def spawn_in(state: BedState, host: str, argv: Sequence[str], **kwargs) -> subprocess.Popen[bytes]:
    """Start argv inside host; kwargs as for migrd.proc.spawn. Returns once the PID runs argv
    itself (past the cgroup wrapper and nsenter), so a caller may checkpoint it at once."""
    h = _check_usable(state, host)
    argv = [os.fspath(a) for a in argv]
    prefix = enter_argv(state, host)
    p = command.spawn([*prefix, *argv], **kwargs)
    # Before its first exec the child still shows our own cmdline, so "not a prefix stage"
    # alone proves nothing; being in the host cgroup as well does.
    shim = prefix[prefix.index("--") + 1:]
    stages = ([*prefix, *argv], [*shim, *argv])
    deadline = time.monotonic() + 20
    while p.poll() is None:
        try:
            cmdline = Path(f"/proc/{p.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        except (FileNotFoundError, ProcessLookupError):
            break
        if [c.decode(errors="replace") for c in cmdline] not in stages and p.pid in cgroup.pids(h.cgroup):
            break
        if time.monotonic() >= deadline:
            raise CommandError(f"{argv[0]} did not start in {host} within 20 s")
        time.sleep(0.005)
    return p


# ---- agents ----------------------------------------------------------------------------------

def _agent_file(h: HostState) -> Path:
    return h.run_dir / "agent.json"


def agent_socket(h: HostState) -> Path:
    """The host's admin socket as seen from the root mount namespace."""
    return h.dir / "state" / HOST_AGENT_SOCKET.name


def start_agents(state: BedState, timeout: float = 30.0) -> dict[str, int]:
    """Start `migrd` in every host (detached, log in the host's /var/lib/migrd/agent.log) with
    the host's own config; return once each answers on its admin socket."""
    from migrd.agent import admin

    pids = {}
    for h in state.hosts:
        if alive(_read_ref(_agent_file(h))):
            raise NotPermitted(f"bed {state.name!r} host {h.name} already runs an agent")
        log_fd = private.open_private(h.dir / "state" / "agent.log", os.O_WRONLY | os.O_APPEND)
        with os.fdopen(log_fd, "ab") as out:
            p = spawn_in(state, h.name, [sys.executable, "-m", "migrd.agent.daemon"], stdout=out, stderr=out)
        private.write_atomic(_agent_file(h), json.dumps(dataclasses.asdict(proc_ref(p.pid))))
        pids[h.name] = p.pid
    deadline = time.monotonic() + timeout
    for h in state.hosts:
        while True:
            try:
                admin.request(agent_socket(h), "status", timeout=5)
                break
            except MigrdError:
                if time.monotonic() >= deadline or not alive(_read_ref(_agent_file(h))):
                    raise CommandError(f"the agent of {h.name} did not come up; see "
                                       f"{h.dir / 'state' / 'agent.log'}") from None
                time.sleep(0.1)
    return pids


def _read_ref(path: Path) -> ProcRef | None:
    try:
        return ProcRef(**json.loads(path.read_text()))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def stop_agent(h: HostState, timeout: float = 60.0) -> None:
    """SIGTERM the host's agent: it finishes (or rolls back) a migration in flight, then exits."""
    stop(_read_ref(_agent_file(h)), timeout)
    _agent_file(h).unlink(missing_ok=True)


# ---- the etcd registry -----------------------------------------------------------------------

#: The bridge namespace's own address: etcd runs there, outside every host's namespaces and
#: cgroup (its CPU is no host's load), reachable from all of them. Never a host's (MAX_HOSTS < 254).
REGISTRY_ADDRESS = f"{SUBNET}.254"
REGISTRY_PORTS = (2379, 2380)  # inside the bed's own namespace: no other listener to collide with


def _registry_file(state: BedState) -> Path:
    return state.run_dir / "etcd.json"


def registry_member(state: BedState) -> etcdserver.Member:
    return etcdserver.Member(f"bed-{state.name}", REGISTRY_ADDRESS, *REGISTRY_PORTS, state.run_dir / "etcd")


def start_registry(state: BedState, timeout: float = 30.0) -> str:
    """Run an etcd member in the bridge namespace on 198.18.0.254 and point every host's config
    at it (daemon.registry: etcd); agents started afterwards use it. Returns its client URL."""
    ref = _read_ref(_registry_file(state))
    if alive(ref):
        raise NotPermitted(f"bed {state.name!r} already runs an etcd (PID {ref.pid})")
    br = NETNS_DIR / state.bridge_netns
    if REGISTRY_ADDRESS not in command.run(["ip", "-n", state.bridge_netns, "-o", "addr", "show", "dev", "br0"]
                                        ).stdout.decode():
        _ip("-n", state.bridge_netns, "addr", "add", f"{REGISTRY_ADDRESS}/24", "dev", "br0")
    m = registry_member(state)
    prefix = ["nsenter", f"--net={br}", "--"]
    p = etcdserver.start(m, state.run_dir / "etcd.log", prefix)
    ref = proc_ref(p.pid)
    private.write_atomic(_registry_file(state), json.dumps(dataclasses.asdict(ref)))
    etcdserver.wait_healthy(m, lambda: alive(ref), timeout, prefix)
    for h in state.hosts:
        path = h.dir / "etc" / HOST_CONFIG.name
        cfg = parse(path.read_text(), str(path))
        etcd = dataclasses.replace(cfg.daemon.etcd, endpoints=(m.client_url,))
        cfg = dataclasses.replace(cfg, daemon=dataclasses.replace(cfg.daemon, registry="etcd", etcd=etcd))
        path.write_text(dump(cfg))
    return m.client_url


def stop_registry(state: BedState) -> None:
    stop(_read_ref(_registry_file(state)))
    _registry_file(state).unlink(missing_ok=True)


def registry_pid(state: BedState) -> int | None:
    ref = _read_ref(_registry_file(state))
    return ref.pid if alive(ref) else None


@dataclass(frozen=True)
class HostStatus:
    name: str
    address: str
    netns: str
    netns_exists: bool
    mount_ns: str | None
    holder_alive: bool
    sshd_pid: int | None
    sshd_alive: bool
    cgroup: tuple[str, ...]
    cpu_quota: float | None
    cpu_seconds: float | None
    processes: int
    link_mbit: float | None = None


def status(state: BedState) -> list[HostStatus]:
    out = []
    for h in state.hosts:
        try:
            quota, used = cgroup.cpu_quota(h.cgroup), cgroup.cpu_usage_ns(h.cgroup) / 1e9
        except (OSError, MigrdError):
            quota, used = None, None
        out.append(HostStatus(
            name=h.name, address=h.address, netns=h.netns, netns_exists=h.netns_path.exists(),
            mount_ns=str(h.mount_ns) if alive(h.holder) else None, holder_alive=alive(h.holder),
            sshd_pid=h.sshd.pid if h.sshd else None, sshd_alive=alive(h.sshd),
            cgroup=tuple(map(str, h.cgroup.dirs)), cpu_quota=quota, cpu_seconds=used,
            processes=len(cgroup.pids(h.cgroup)), link_mbit=h.link_mbit,
        ))
    return out
