"""runc: run, list, checkpoint and restore containers (the container subject's adapter).

Each host keeps its containers' runtime state in its own directory (`runc --root`,
state_dir/runc) and their bundles in state_dir/containers/NAME (config.json, rootfs, the CRIU
config file, the stdout log). runc is pointed at migrd's CRIU with `--criu`.

Two facts of runc with CRIU shape this adapter:
- a container's stdio must be pipes, at `run` and at every `restore` (a file or /dev/null as
  stdio makes the dump fail with "Can't lookup mount"). Its stdout and stderr go into a pipe
  read by a `cat` that appends to the bundle's stdout.log and ends with the container;
- runc has no "restore stopped": the bundle's CRIU config file (named by the annotation
  org.criu.config) says `leave-stopped` for a restore that waits for the commit, and is
  rewritten without it before the container is let go (CRIU reads it at every dump and
  restore). The file also names the network lock, the same as migrd's own dumps use.
"""

from __future__ import annotations

import builtins
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from migrd.adapters import command, private
from migrd.adapters.criu import Criu, error_lines
from migrd.errors import ContainerError, CriuError, MigrdError

#: The annotation that opts a container in to migration.
MIGRATABLE = "io.migrd.migratable"
#: The annotation naming the image a migrd bundle was made from.
IMAGE = "io.migrd.image"
#: runc's annotation for a CRIU configuration file.
CRIU_CONFIG = "org.criu.config"
#: Where images live (the same path on every host; see scripts/build-image.sh).
IMAGES = Path(os.environ.get("MIGRD_IMAGES", "/var/cache/migrd/images"))


@dataclass(frozen=True)
class State:
    """`runc state` of one container."""

    name: str
    pid: int
    status: str
    bundle: str
    annotations: dict[str, str]


def config(name: str, args: list[str], *, image: str, criu_config: Path, migratable: bool, cgroup: str,
           cwd: str = "/", env: tuple[str, ...] = ()) -> dict[str, Any]:
    """A bundle's config.json (pure): the host's network namespace (no address of its own to
    move), private PID, mount, IPC and UTS namespaces, a writable rootfs, the cgroup `cgroup`."""
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    annotations = {IMAGE: image, CRIU_CONFIG: str(criu_config)}
    if migratable:
        annotations[MIGRATABLE] = "true"
    return {
        "ociVersion": "1.0.2-dev",
        "process": {
            "terminal": False, "user": {"uid": 0, "gid": 0}, "args": args, "cwd": cwd,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin", *env],
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted", "ambient")},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": name,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs",
             "options": ["nosuid", "noexec", "nodev", "ro"]},
        ],
        "annotations": annotations,
        "linux": {
            "cgroupsPath": cgroup,
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"],
        },
    }


class Runc:
    def __init__(self, binary: str, root: Path, criu: Criu) -> None:
        self.binary = binary
        self.root = root
        self.criu = criu

    def _argv(self, *args: str) -> list[str]:
        return [self.binary, "--root", str(self.root), "--criu", self.criu.path, *args]

    def _run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        private.private_dir(self.root)
        return command.run(self._argv(*args), check=False, timeout=timeout)

    def version(self) -> str:
        r = command.run([self.binary, "--version"], check=False, timeout=30)
        return command.last_line(r.stdout.splitlines()[0] if r.stdout else r.stderr)

    def works(self) -> tuple[bool, str]:
        """runc runs and its CRIU passes `criu check`."""
        try:
            self.version()
        except MigrdError as e:
            return False, str(e)
        ok, msg = self.criu.check()
        return ok, "" if ok else f"criu check: {msg}"

    def list(self) -> list[State]:
        r = self._run("list", "--format", "json")
        if r.returncode != 0:
            raise ContainerError(f"runc list: {command.last_line(r.stderr)}")
        return [s for s in (self.state(c["id"]) for c in json.loads(r.stdout or b"null") or []) if s]

    def state(self, name: str) -> State | None:
        r = self._run("state", name)
        if r.returncode != 0:
            return None
        raw = json.loads(r.stdout)
        return State(raw["id"], int(raw.get("pid") or 0), raw["status"], raw["bundle"],
                     dict(raw.get("annotations") or {}))

    # builtins.list: in this class body `list` names the method above.
    def _with_stdio(self, argv: builtins.list[str], bundle: Path, timeout: float) -> tuple[int, str]:
        """Run argv with the container's stdio as pipes (see the module's docstring); returns
        runc's exit status and its last log line."""
        log = bundle / "runc.log"
        out = private.open_private(bundle / "stdout.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        r, w = os.pipe()
        stdin_r, stdin_w = os.pipe()
        os.close(stdin_w)  # the container reads EOF
        try:
            command.spawn(["cat"], stdin=r, stdout=out, stderr=subprocess.DEVNULL)
            os.close(r)
            r = -1
            proc = command.spawn([*argv[:1], "--log", str(log), "--log-format", "json", *argv[1:]], stdin=stdin_r, stdout=w,
                                 stderr=w, new_session=False)
            try:
                status = proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                status = -9
        finally:
            for fd in (out, w, stdin_r, r):
                if fd >= 0:
                    os.close(fd)
        try:
            lines = [json.loads(ln).get("msg", "") for ln in log.read_text().splitlines() if ln.startswith("{")]
        except (OSError, ValueError):
            lines = []
        return status, (lines[-1] if lines else "")

    def run(self, name: str, bundle: Path) -> State:
        status, msg = self._with_stdio(self._argv("run", "-d", "--bundle", str(bundle), name), bundle, 60)
        st = self.state(name)
        if status != 0 or st is None:
            raise ContainerError(f"runc run {name}: {msg or f'exit {status}'}")
        return st

    def checkpoint(self, name: str, images: Path, work: Path, *, leave_running: bool = False,
                   tcp_established: bool = False) -> float:
        """Dump with CRIU; without leave_running runc ends and deletes the container."""
        private.private_dir(work)
        args = ["checkpoint", "--image-path", str(images), "--work-path", str(work)]
        args += ["--leave-running"] if leave_running else []
        args += ["--tcp-established"] if tcp_established else []
        t0 = time.monotonic()
        r = self._run(*args, name, timeout=600)
        if r.returncode != 0:
            raise self._criu_failed("checkpoint", work / "dump.log", r.stderr)
        return time.monotonic() - t0

    def restore(self, name: str, bundle: Path, images: Path, work: Path, *,
                tcp_established: bool = False) -> float:
        private.private_dir(work)
        args = ["restore", "-d", "--image-path", str(images), "--work-path", str(work), "--bundle", str(bundle)]
        args += ["--tcp-established"] if tcp_established else []
        t0 = time.monotonic()
        status, msg = self._with_stdio(self._argv(*args, name), bundle, 600)
        if status != 0:
            self.remove(name)  # a failed restore can leave a "stopped" container behind
            raise self._criu_failed("restore", work / "restore.log", msg.encode())
        return time.monotonic() - t0

    def _criu_failed(self, action: str, log: Path, stderr: bytes) -> CriuError:
        try:
            lines = error_lines(log.read_text(errors="replace"))
        except OSError:
            lines = []
        return CriuError(f"(runc {action})", lines or [command.last_line(stderr)], log)

    def signal_all(self, name: str, sig: str) -> None:
        r = self._run("kill", "--all", name, sig)
        if r.returncode != 0:
            raise ContainerError(f"runc kill --all {name} {sig}: {command.last_line(r.stderr)}")

    def remove(self, name: str) -> None:
        """End the container (if it runs) and forget it. Idempotent."""
        if self.state(name) is not None:
            self._run("delete", "--force", name)


def find_runc(root: Path, criu: Criu) -> Runc:
    binary = shutil.which("runc")
    if binary is None:
        raise ContainerError("runc is not installed: run `make setup` (scripts/setup-system.sh)")
    return Runc(binary, root, criu)
