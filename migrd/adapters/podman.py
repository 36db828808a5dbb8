"""Podman with runc: run, inspect, checkpoint (exported) and restore (imported) containers.

Every host keeps its own storage and state under state_dir/podman (the bed's hosts share one
filesystem otherwise). Podman runs containers with runc (`--runtime runc`: Debian 12's default
crun cannot checkpoint) and finds CRIU as `criu` on PATH: a link in state_dir/podman/bin to
migrd's CRIU. Containers get lowered limits (`--ulimit`; podman's defaults fail here with
"error setting rlimit"), their host's network namespace like runc containers (`--network
host`: podman's default bridge network is 10.88.0.0/16, which must not be used; a moved
container keeps serving at a moved address), and the annotation org.criu.config naming a
CRIU configuration file of their own, which says `leave-stopped` while a restore must wait for
the commit (see migrd/adapters/runc.py).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import command, private
from migrd.adapters.criu import Criu
from migrd.errors import ContainerError, CriuError, MigrdError

MIGRATABLE = "io.migrd.migratable"
IMAGE = "io.migrd.image"
CRIU_CONFIG = "org.criu.config"


@dataclass(frozen=True)
class State:
    name: str
    pid: int
    status: str
    image_id: str
    labels: dict[str, str]
    annotations: dict[str, str]


class Podman:
    def __init__(self, binary: str, home: Path, criu: Criu) -> None:
        self.binary = binary
        self.home = home
        self.criu = criu

    def criu_config(self, name: str) -> Path:
        return self.home / "criu" / f"{name}.conf"

    def _env(self) -> dict[str, str]:
        bin_dir = private.private_dir(self.home / "bin")
        link = bin_dir / "criu"
        if not link.is_symlink() or os.readlink(link) != self.criu.path:
            link.unlink(missing_ok=True)
            link.symlink_to(self.criu.path)
        return {**os.environ, "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}

    def _run(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[bytes]:
        for d in ("storage", "run", "tmp", "criu"):
            private.private_dir(self.home / d)
        argv = [self.binary, "--root", str(self.home / "storage"), "--runroot", str(self.home / "run"),
                "--tmpdir", str(self.home / "tmp"), "--cgroup-manager", "cgroupfs", "--events-backend", "file",
                "--runtime", "runc", *args]
        return command.run(argv, check=False, timeout=timeout, env=self._env())

    def _ok(self, *args: str, timeout: float = 120) -> bytes:
        r = self._run(*args, timeout=timeout)
        if r.returncode != 0:
            raise ContainerError(f"podman {args[0]}: {command.last_line(r.stderr)}")
        return r.stdout

    def works(self) -> tuple[bool, str]:
        try:
            self._ok("version", "--format", "{{.Client.Version}}")
        except MigrdError as e:
            return False, str(e)
        ok, msg = self.criu.check()
        return ok, "" if ok else f"criu check: {msg}"

    def image_id(self, ref: str) -> str | None:
        r = self._run("image", "inspect", "--format", "{{.ID}}", ref)
        return r.stdout.decode().strip() if r.returncode == 0 else None

    def load(self, archive: Path) -> None:
        self._ok("load", "-q", "-i", str(archive), timeout=300)

    def run(self, name: str, image: str, args: list[str], *, migratable: bool, image_name: str) -> State:
        conf = self.criu_config(name)
        private.write_atomic(conf, self.criu.config_file(leave_stopped=False))
        labels = ["--label", f"{MIGRATABLE}=true"] if migratable else []
        self._ok("run", "-d", "--name", name, "--network", "host", "--ulimit", "nofile=1024:1024",
                 "--ulimit", "nproc=4096:4096", "--annotation", f"{CRIU_CONFIG}={conf}",
                 "--annotation", f"{IMAGE}={image_name}", *labels, image, *args)
        st = self.state(name)
        if st is None:
            raise ContainerError(f"podman run {name}: no such container afterwards")
        return st

    def state(self, name: str) -> State | None:
        r = self._run("container", "inspect", name)
        if r.returncode != 0:
            return None
        raw = json.loads(r.stdout)[0]
        return State(raw["Name"], int(raw["State"].get("Pid") or 0), raw["State"]["Status"], raw["Image"],
                     dict(raw["Config"].get("Labels") or {}), dict(raw["Config"].get("Annotations") or {}))

    def names(self) -> list[str]:
        out = json.loads(self._ok("ps", "-a", "--format", "json") or b"[]") or []
        return [c["Names"][0] for c in out if c.get("Names")]

    def mount(self, name: str) -> Path:
        return Path(self._ok("mount", name).decode().strip())

    def unmount(self, name: str) -> None:
        self._run("umount", name)

    def checkpoint(self, name: str, archive: Path, *, tcp_established: bool = False) -> float:
        """Dump into archive (the container exits; its local checkpoint is kept for a rollback)."""
        args = ["container", "checkpoint", "--keep", "--export", str(archive), "--compress", "none"]
        args += ["--tcp-established"] if tcp_established else []
        t0 = time.monotonic()
        r = self._run(*args, name, timeout=600)
        if r.returncode != 0:
            raise CriuError("(podman checkpoint)", [command.last_line(r.stderr)], None)
        return time.monotonic() - t0

    def restore(self, name: str, archive: Path | None, *, tcp_established: bool = False) -> float:
        """From an exported archive (a target), or from the kept local checkpoint (a rollback)."""
        args = ["container", "restore", "--keep"]
        args += ["--import", str(archive)] if archive is not None else []
        args += ["--tcp-established"] if tcp_established else []
        t0 = time.monotonic()
        r = self._run(*args, *([] if archive is not None else [name]), timeout=600)
        if r.returncode != 0:
            raise CriuError("(podman restore)", [command.last_line(r.stderr)], None)
        return time.monotonic() - t0

    def remove(self, name: str) -> None:
        """End and delete the container (idempotent)."""
        self._run("rm", "-f", name)
        conf = self.criu_config(name)
        if conf.is_file():  # only ours: never something else found at that path
            conf.unlink()


def find_podman(home: Path, criu: Criu) -> Podman:
    binary = shutil.which("podman")
    if binary is None:
        raise ContainerError("podman is not installed: run `make setup` (scripts/setup-system.sh)")
    return Podman(binary, home, criu)
