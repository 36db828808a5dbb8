"""Will this migration work? Pure decisions over facts gathered on each side.

The source decides whether the process may move at all (opt-in rules); the target reports
facts about itself and `evaluate` turns request + facts into every reason it would fail, so a
refusal names all problems at once and changes nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

from migrd.config import MigrateSettings
from migrd.model import FileIdentity, ProcessInfo

MODES = ("move", "clone", "restart")


@dataclass(frozen=True)
class ProcessFacts:
    """What the target found for a process tree's ask."""

    #: PID -> description, for PIDs held by processes other than the one being moved.
    pids_taken: dict[int, str] = field(default_factory=dict)
    #: path -> size on the target (None: absent).
    files: dict[str, int | None] = field(default_factory=dict)
    #: path -> identity on the target over the source's size (None: absent, unreadable or
    #: shorter), for the paths in ProcessAsk.identities.
    identities: dict[str, FileIdentity | None] = field(default_factory=dict)


@dataclass(frozen=True)
class ContainerFacts:
    runtime_ok: bool
    runtime_message: str = ""
    #: The image's digest there (None: no such image).
    image_digest: str | None = None
    #: The runtime's ID of that image there (None: not there), asked when the source gave one.
    image_id: str | None = None
    #: The name is held there by a container or a bundle.
    name_taken: bool = False
    loopback_up: bool = True


SubjectFacts = ProcessFacts | ContainerFacts


@dataclass(frozen=True)
class ProcessAsk:
    """A process tree's part of a precheck request: its PIDs and the files it holds open."""

    #: The tree's root and its start time: only to tell whether this very process is the one
    #: holding its PIDs on the target (hosts sharing one PID space).
    pid: int
    start_time: float
    tree_ids: tuple[int, ...]
    own_pid_namespace: bool
    #: (path, size) of regular files the process has open.
    files: tuple[tuple[str, int | None], ...]
    #: path -> identity here, for the open files whose identity could be taken.
    identities: dict[str, FileIdentity] = field(default_factory=dict)
    kind: Literal["process"] = "process"

    def problems(self, req: Request, facts: SubjectFacts | None) -> list[str]:
        if not isinstance(facts, ProcessFacts):
            return [f"the target did not check the process tree of PID {self.pid}"]
        out = []
        if req.needs_criu and not self.own_pid_namespace and facts.pids_taken:
            pid, who = sorted(facts.pids_taken.items())[0]
            out.append(f"PID {pid} is taken on the target by {who} (the process needs its PIDs; "
                       f"start workloads with `migrctl run` to avoid this)")
        for path, size in self.files:
            there = facts.files.get(path)
            here_id, there_id = self.identities.get(path), facts.identities.get(path)
            if shared(here_id, there_id):
                continue
            if path in req.carry:
                if same_inode(here_id, there_id):
                    out.append(f"open file {path} has the same filesystem and inode on the target "
                               f"but other contents; copying it there would overwrite it")
                continue
            if there is None:
                out.append(f"open file {path} does not exist on the target (use --with-files)")
            elif size is not None and there != size:
                out.append(f"open file {path} has size {there} on the target, {size} here "
                           f"(use --with-files)")
        return out

    def not_to_copy(self, carry: tuple[str, ...], facts: SubjectFacts | None) -> tuple[str, ...]:
        if not isinstance(facts, ProcessFacts):
            return ()
        return tuple(p for p in carry if same_inode(self.identities.get(p), facts.identities.get(p)))


@dataclass(frozen=True)
class ContainerAsk:
    """A container's part of a precheck request. Its files and PIDs live in its own rootfs and
    PID namespace, not the host's: the target checks its runtime, image and name instead."""

    name: str
    #: The runtime, which is also the kind of subject (migrd.engine.subjects) checking it there.
    runtime: str
    image: str
    image_digest: str
    #: The runtime's image ID, when restoring needs the very same one (Podman).
    image_id: str = ""
    kind: Literal["container"] = "container"

    def problems(self, req: Request, facts: SubjectFacts | None) -> list[str]:
        if not isinstance(facts, ContainerFacts):
            return [f"the target did not check container {self.name}"]
        out = []
        if not facts.runtime_ok:
            out.append(f"{self.runtime} does not work with CRIU on the target: {facts.runtime_message}")
        if facts.image_digest is None:
            out.append(f"image {self.image} is not on the target (run `make setup` there)")
        elif facts.image_digest != self.image_digest:
            out.append(f"image {self.image} on the target differs from the source's")
        elif self.image_id and facts.image_id != self.image_id:
            out.append(f"{self.runtime}'s image {self.image} on the target has another ID than the source's")
        if facts.name_taken:
            out.append(f"a container named {self.name} exists on the target")
        if not facts.loopback_up:
            out.append("the loopback interface is down on the target (CRIU's TCP repair check needs it)")
        return out

    def not_to_copy(self, carry: tuple[str, ...], facts: SubjectFacts | None) -> tuple[str, ...]:
        return ()  # its files travel as rootfs changes, never as carried files


#: A subject's own part of a precheck request (in JSON, told apart by `kind`).
Ask = ProcessAsk | ContainerAsk


@dataclass(frozen=True)
class Request:
    """What the source asks the target to check (sent as JSON): what every move needs, and
    the subject's own ask."""

    id: str
    mode: str
    rss: int
    ports: tuple[int, ...]
    #: The open files the migration copies to the target itself.
    carry: tuple[str, ...]
    with_files: bool
    move_address: str | None
    headroom: float
    ask: Ask
    #: base64 of `criu cpuinfo dump`'s cpuinfo.img (None for restart mode).
    cpuinfo: str | None = None

    @property
    def needs_criu(self) -> bool:
        return self.mode in ("move", "clone")


@dataclass(frozen=True)
class TargetFacts:
    criu_ok: bool
    criu_message: str
    cpu_ok: bool
    cpu_message: str
    mem_available: int
    disk_free: int
    #: The directory whose filesystem disk_free measures (where the images will land).
    disk_path: str = ""
    ports_taken: tuple[int, ...] = ()
    address_present: bool = False
    address_interface: str | None = None
    incoming_exists: bool = False
    #: The facts for the request's ask (None: not gathered).
    subject: SubjectFacts | None = None


def opt_in(settings: MigrateSettings, info: ProcessInfo, user: str, cgroups: list[str],
           registered: bool) -> str | None:
    """Why the process may migrate (a reason string), or None when no rule allows it."""
    return allowed(settings, info.cmdline, user, cgroups, registered)


def allowed(settings: MigrateSettings, cmdline: tuple[str, ...], user: str, cgroups: list[str],
            registered: bool) -> str | None:
    """`opt_in` from the cheap facts alone (the agent asks this of every process each round)."""
    if registered:
        return "started with `migrctl run`"
    if user in settings.allow_users:
        return f"user {user} is in migrate.allow_users"
    line = " ".join(cmdline)
    for pattern in settings.allow_commands:
        if re.search(pattern, line):
            return f"command matches migrate.allow_commands {pattern!r}"
    for prefix in settings.allow_cgroups:
        if any(cg == prefix or cg.startswith(prefix.rstrip("/") + "/") for cg in cgroups):
            return f"cgroup is under migrate.allow_cgroups {prefix!r}"
    return None


def same_inode(here: FileIdentity | None, there: FileIdentity | None) -> bool:
    """The target may be looking at this very file (same filesystem ID and inode): copying
    it there would write the file onto itself, truncating it first."""
    return here is not None and there is not None and (here.fsid, here.inode) == (there.fsid, there.inode)


def shared(here: FileIdentity | None, there: FileIdentity | None) -> bool:
    """The target sees this very file on storage both hosts share: same filesystem and inode,
    and the bytes read here are there too (it may have grown since, as a log does while its
    writer runs). Its size is then CRIU's to check, after the freeze."""
    return same_inode(here, there) and here == there


def not_to_copy(req: Request, facts: TargetFacts) -> tuple[str, ...]:
    """The carried files that must not be copied, because the target may see them already."""
    return req.ask.not_to_copy(req.carry, facts.subject)


def evaluate(req: Request, facts: TargetFacts) -> list[str]:
    """Every reason the migration would fail on this target; empty means go."""
    problems: list[str] = []
    if req.needs_criu and not facts.criu_ok:
        problems.append(f"CRIU does not work on the target: {facts.criu_message}")
    if req.needs_criu and not facts.cpu_ok:
        problems.append(f"CPU not compatible with the source: {facts.cpu_message}")
    need = int(req.rss * req.headroom)
    if facts.mem_available < need:
        problems.append(f"target has {facts.mem_available >> 20} MiB memory available, "
                        f"needs {need >> 20} MiB")
    if req.needs_criu and facts.disk_free < need:
        where = f" in {facts.disk_path}" if facts.disk_path else ""
        problems.append(f"target has {facts.disk_free >> 20} MiB free disk{where} for images, "
                        f"needs {need >> 20} MiB")
    problems += req.ask.problems(req, facts.subject)
    if facts.ports_taken:
        problems.append("ports already listening on the target: "
                        + ", ".join(map(str, sorted(facts.ports_taken))))
    if req.move_address:
        if facts.address_present:
            problems.append(f"address {req.move_address} is already in use on the target")
        if facts.address_interface is None:
            problems.append(f"the target has no interface in the network of {req.move_address}")
    if facts.incoming_exists:
        problems.append(f"the target already has an incoming migration {req.id}")
    return problems
