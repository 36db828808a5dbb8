"""Migratable workloads started with `migrctl run`, and the registry of them on this host.

A workload runs as the init of its own PID namespace. CRIU then recreates that namespace on
restore, so the workload never needs its old PID to be free on the target: two hosts that share
a PID space (the embedded bed) or a target where that PID is taken still work, and a rollback
never races a zombie for its PID. Measured: a plain process restored on the bed waits for PID 1
to reap the dumped task's zombie (seconds), a PID-namespace workload does not wait at all.

A service that runs as an unprivileged user (`migrctl run --user USER`) is the exception: it
runs in the host's PID space, with migrctl dropping the rights for it. CRIU needs a /proc of
the dumped PID namespace from inside its init and mounts one when the init sees its parent's;
a service user may not mount, so the dump fails. An own mount namespace with its own /proc
(`unshare --mount-proc`) gets past that, but then CRIU dumps that namespace: the host's whole
mount tree, which failed here on other namespaces' nsfs mounts and, once made external, on
restore when the tree had changed; on another host it would rebuild the source's tree.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import time
from contextlib import suppress
from dataclasses import asdict, dataclass
from pathlib import Path


from migrd.adapters import command, private, procfs
from migrd.errors import InputError, MigrdError

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


@dataclass(frozen=True)
class Workload:
    name: str
    pid: int
    start_time: float
    cmdline: tuple[str, ...]
    cwd: str
    stdout: str
    host: str | None = None
    #: When it arrived here by a migration (epoch seconds); None if started here.
    arrived: float | None = None

    def alive(self) -> bool:
        return same_process(self.pid, self.start_time)


def same_process(pid: int, start_time: float) -> bool:
    """True when pid runs the process that started at start_time (not a recycled PID)."""
    started = procfs.start_time(pid)
    return started is not None and abs(started - start_time) < 0.05 and procfs.state(pid) not in (None, "Z")


def end(pid: int, start_time: float, signals: tuple[int, ...] = (signal.SIGKILL,),
        grace: float = 10.0) -> None:
    """Send each signal in turn to the process that started at start_time (never to a recycled
    PID), waiting up to grace seconds after each for it to be gone."""
    for sig in signals:
        if not same_process(pid, start_time):
            return
        os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while same_process(pid, start_time) and time.monotonic() < deadline:
            time.sleep(0.05)


def resume(pid: int, start_time: float) -> None:
    """SIGCONT the process that started at start_time and all its descendants (CRIU leaves a
    whole tree stopped)."""
    if not same_process(pid, start_time):
        return
    for p in (pid, *procfs.descendants(pid)):
        with suppress(ProcessLookupError):
            os.kill(p, signal.SIGCONT)


class Registry:
    """One JSON file per workload under state_dir/workloads/."""

    def __init__(self, state_dir: Path) -> None:
        self.dir = state_dir / "workloads"

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.json"

    def add(self, w: Workload) -> None:
        private.private_dir(self.dir)
        private.write_atomic(self.path(w.name), json.dumps(asdict(w), indent=2))

    def remove(self, name: str) -> None:
        self.path(name).unlink(missing_ok=True)

    def all(self) -> list[Workload]:
        if not self.dir.is_dir():
            return []
        out = []
        for f in sorted(self.dir.glob("*.json")):
            raw = json.loads(f.read_text())
            raw["cmdline"] = tuple(raw["cmdline"])
            out.append(Workload(**raw))
        return out

    def by_pid(self, pid: int) -> Workload | None:
        for w in self.all():
            if w.pid == pid and w.alive():
                return w
        return None

    def get(self, name: str) -> Workload | None:
        return next((w for w in self.all() if w.name == name), None)

    def fresh_name(self, cmdline: tuple[str, ...]) -> str:
        base = re.sub(r"[^A-Za-z0-9_.-]", "-", Path(cmdline[0]).name)[:40] or "workload"
        taken = {w.name for w in self.all()}
        i = 1
        while f"{base}-{i}" in taken:
            i += 1
        return f"{base}-{i}"


def check_name(name: str) -> None:
    """A workload name is one plain file name in workloads/ (never a path: `../x`)."""
    if not _NAME.match(name):
        raise InputError(f"workload name {name!r}: use letters, digits, '.', '_' and '-'")


def as_user(user: str) -> list[str]:
    """argv prefix that runs a program as user (name or number), its primary group and its
    supplementary groups, as a service manager would."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise InputError(f"no user {user!r} on this host") from None
    return ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--init-groups", "--"]


def user_of(uid: int) -> str | None:
    """Who a fresh start of a process that ran as uid runs as (`as_user`): that user, unless
    it is root (None: as migrd runs)."""
    return None if uid == 0 else str(uid)


def start(state_dir: Path, cmdline: tuple[str, ...], name: str | None = None,
          cwd: str | None = None, env: dict[str, str] | None = None,
          host: str | None = None, user: str | None = None) -> Workload:
    """Start cmdline detached as the init of a new PID namespace, or with user as that user
    in a session of its own; register and return it."""
    if not cmdline:
        raise InputError("no command given (usage: migrctl run -- CMD ARGS...)")
    reg = Registry(state_dir)
    name = name or reg.fresh_name(cmdline)
    check_name(name)
    if (old := reg.get(name)) and old.alive():
        raise InputError(f"a workload named {name!r} is already running (PID {old.pid})")
    logs = private.private_dir(state_dir / "workloads" / "logs")
    out_path = logs / f"{name}.out"
    # Append mode: CRIU refuses to restore a regular file whose size changed after the dump,
    # except files opened O_WRONLY|O_APPEND.
    out = private.open_private(out_path, os.O_WRONLY | os.O_APPEND)
    try:
        if user is not None:
            launcher = command.spawn([*as_user(user), *cmdline], stdout=out, stderr=out, env=env,
                                     cwd=cwd or "/")
        else:
            # The inner setsid makes the namespace's init a session leader: CRIU refuses a
            # session leader outside the dumped PID namespace.
            launcher = command.spawn(["unshare", "--pid", "--fork", "--", "setsid", "--", *cmdline],
                                     stdout=out, stderr=out, env=env, cwd=cwd or "/")
    finally:
        os.close(out)
    init = launcher.pid if user is not None else _wait_child(launcher.pid)
    started = procfs.start_time(init)
    if started is None:
        raise MigrdError("the workload exited at once (see its output log)")
    w = Workload(name, init, started, tuple(cmdline), cwd or "/", str(out_path), host)
    reg.add(w)
    return w


def _wait_child(pid: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = procfs.children(pid)
        if kids:
            return kids[0]
        if procfs.state(pid) in (None, "Z"):
            break
        time.sleep(0.01)
    raise MigrdError("the workload exited at once (see its output log)")
