"""Containers on this host (runc): create, describe, checkpoint with their rootfs changes, and
restore, on the source (a rollback) or on a target (a fresh bundle: the image, found here by
content, plus the changes the images carry).

A container's bundle is state_dir/containers/NAME, its runtime state state_dir/runc (per
host: the bed gives every host its own state_dir). Images are trees under runc.IMAGES.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import socket
from dataclasses import asdict
from pathlib import Path
from typing import Any

from migrd.adapters import private, procinfo, rootfs, runc
from migrd.adapters.criu import find_criu
from migrd.config import Config
from migrd.core import rootfs as rootfs_core
from migrd.engine import checkpoint as cp
from migrd.engine import failpoints
from migrd.engine import manifest as mf
from migrd.errors import ContainerError, ImageError, InputError, MigrdError
from migrd.model import ContainerInfo, ProcessInfo

RUNTIME = "runc"
#: The bundle's config.json travels in the image directory under this name.
CONFIG_BLOB = "bundle-config.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def check_name(name: str) -> None:
    if not _NAME.fullmatch(name):
        raise InputError(f"bad container name {name!r} (letters, digits, _ . -; at most 64)")


def runtime(cfg: Config) -> runc.Runc:
    return runc.find_runc(cfg.state_dir / "runc", find_criu(cfg))


def bundle_of(cfg: Config, name: str) -> Path:
    check_name(name)
    return cfg.state_dir / "containers" / name


def cgroup_of(cfg: Config, name: str) -> str:
    """Its cgroup: per host, since hosts may share one cgroup tree (the bed's do). One level,
    so that `runc delete` leaves no empty parent behind."""
    return f"/migrd-{cfg.host or socket.gethostname()}-{name}"


def image_root(image: str) -> Path:
    check_name(image)
    return runc.IMAGES / image / "rootfs"


def tree_digest(entries: dict[str, rootfs_core.Entry]) -> str:
    listing = json.dumps(sorted((p, asdict(e)) for p, e in entries.items()), sort_keys=True)
    return hashlib.sha256(listing.encode()).hexdigest()


def image_digest(image: str) -> str | None:
    """The image tree's digest here (None: no such image here)."""
    root = image_root(image)
    return tree_digest(rootfs.scan(root)) if root.is_dir() else None


def create(cfg: Config, name: str, args: list[str], image: str = "busybox", migratable: bool = True) -> runc.State:
    """A new container NAME running args in a copy of image."""
    bundle = bundle_of(cfg, name)
    rt = runtime(cfg)
    if bundle.exists() or rt.state(name) is not None:
        raise ContainerError(f"container {name} exists on this host")
    if not image_root(image).is_dir():
        raise ContainerError(f"no image {image} here ({image_root(image)}): run `make setup`")
    try:
        rootfs.copy_image(image_root(image), bundle / "rootfs")
        private.write_atomic(bundle / "criu.conf", rt.criu.config_file(leave_stopped=False))
        spec = runc.config(name, args, image=image, criu_config=bundle / "criu.conf", migratable=migratable,
                           cgroup=cgroup_of(cfg, name))
        private.write_atomic(bundle / "config.json", json.dumps(spec, indent=1))
        return rt.run(name, bundle)
    except BaseException:
        rt.remove(name)
        shutil.rmtree(bundle, ignore_errors=True)
        raise


def exists(cfg: Config, name: str) -> bool:
    try:
        return runtime(cfg).state(name) is not None
    except MigrdError:
        return False


def remove(cfg: Config, name: str) -> None:
    """End the container and drop its bundle (idempotent)."""
    runtime(cfg).remove(name)
    shutil.rmtree(bundle_of(cfg, name), ignore_errors=True)


def describe(cfg: Config, name: str) -> tuple[ContainerInfo, ProcessInfo]:
    check_name(name)
    st = runtime(cfg).state(name)
    if st is None:
        raise InputError(f"no container {name} on this host")
    if st.status != "running" or not st.pid:
        raise InputError(f"container {name} is {st.status}, not running")
    bundle = Path(st.bundle)
    try:
        config = json.loads((bundle / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ContainerError(f"container {name}: cannot read {bundle}/config.json ({e})") from None
    image = st.annotations.get(runc.IMAGE)
    if not image:
        raise ContainerError(f"container {name} was not made from a migrd image (no {runc.IMAGE} annotation)")
    digest = image_digest(image)
    if digest is None:
        raise ContainerError(f"container {name}: its image {image} is not here ({image_root(image)})")
    info = procinfo.inspect(st.pid)
    return ContainerInfo(name, RUNTIME, image, digest, str(bundle), config,
                         st.annotations.get(runc.MIGRATABLE) == "true"), info


def listing(cfg: Config) -> list[dict[str, Any]]:
    """This host's containers for `migrctl ps`."""
    try:
        states = runtime(cfg).list()
    except MigrdError:
        return []
    return [{"kind": "container", "runtime": RUNTIME, "name": s.name, "pid": s.pid, "status": s.status,
             "alive": s.status == "running", "image": s.annotations.get(runc.IMAGE),
             "migratable": s.annotations.get(runc.MIGRATABLE) == "true"} for s in states]


def checkpoint(cfg: Config, c: ContainerInfo, info: ProcessInfo, images: Path, *,
               tcp_established: bool = False) -> cp.Checkpoint:
    """runc checkpoint (which ends the container), then the rootfs changes against the image
    into the same directory, then the manifest."""
    private.private_dir(images)
    bundle = Path(c.bundle)
    try:
        with failpoints.dying_while("dumping"):
            seconds = runtime(cfg).checkpoint(c.name, images, images.parent / "runc-work",
                                              tcp_established=tcp_established)
        failpoints.point("dumped")
        base = rootfs.scan(image_root(c.image))
        if tree_digest(base) != c.image_digest:
            raise ImageError(f"image {c.image} changed here during the migration")
        changes = rootfs.export(bundle / "rootfs", rootfs_core.changes(base, rootfs.scan(bundle / "rootfs")), images)
        private.write_atomic(images / CONFIG_BLOB, json.dumps(c.config))
        private.restrict_files(images)
        m = cp.write_manifest(cfg, find_criu(cfg), images, info, {"tcp_established": tcp_established},
                              subject=RUNTIME, container=c, rootfs=changes)
    except BaseException:
        shutil.rmtree(images, ignore_errors=True)
        raise
    return cp.Checkpoint(m, images, seconds, images.parent / "runc-work" / "dump.log")


def restore(cfg: Config, images: Path, *, leave_stopped: bool, hashed: bool = False,
            fresh_bundle: bool = True) -> tuple[int, float]:
    """Restore the container the images hold; returns the PID of its init and the seconds
    the restore took. fresh_bundle: build the bundle here (a target); False: the source's own
    bundle, untouched since the dump, is reused (a rollback)."""
    m = mf.verify(images, hashes=not hashed)
    c = m.container
    if c is None:
        raise ImageError(f"{images} holds no container")
    bundle = bundle_of(cfg, c.name)
    if fresh_bundle:
        if bundle.exists():
            raise ContainerError(f"a bundle for container {c.name} exists here already ({bundle})")
        if image_digest(c.image) != c.image_digest:
            raise ContainerError(f"image {c.image} here is missing or differs from the source's")
    try:
        if fresh_bundle:
            rootfs.copy_image(image_root(c.image), bundle / "rootfs")
            rootfs.apply(bundle / "rootfs", m.rootfs, images)
            wrong = rootfs.check(bundle / "rootfs", m.rootfs)
            if wrong:
                raise ImageError(f"container {c.name}: rootfs changes not applied: {'; '.join(wrong[:3])}")
            config = dict(c.config)
            config["annotations"] = {**config.get("annotations", {}), runc.CRIU_CONFIG: str(bundle / "criu.conf")}
            config["linux"] = {**config.get("linux", {}), "cgroupsPath": cgroup_of(cfg, c.name)}
            private.write_atomic(bundle / "config.json", json.dumps(config, indent=1))
        return _runc_restore(cfg, c.name, images, leave_stopped=leave_stopped,
                             tcp_established=bool(m.options.get("tcp_established")))
    except BaseException:
        if fresh_bundle:
            remove(cfg, c.name)
        raise
    finally:
        private.restrict_files(images)


def restore_unverified(cfg: Config, c: ContainerInfo, images: Path, tcp_established: bool) -> int:
    """A rollback after a crash between runc's dump and the manifest: these images never left
    this host and the bundle is as the dump left it, so runc may read them unverified."""
    return _runc_restore(cfg, c.name, images, leave_stopped=False, tcp_established=tcp_established)[0]


def _runc_restore(cfg: Config, name: str, images: Path, *, leave_stopped: bool,
                  tcp_established: bool) -> tuple[int, float]:
    bundle = bundle_of(cfg, name)
    rt = runtime(cfg)
    # A restore that waits for the commit leaves the tasks stopped; `resume` drops that.
    private.write_atomic(bundle / "criu.conf", rt.criu.config_file(leave_stopped=leave_stopped))
    seconds = rt.restore(name, bundle, images, images.parent / "runc-work", tcp_established=tcp_established)
    st = rt.state(name)
    if st is None or not st.pid:
        raise ContainerError(f"container {name} is not there after its restore")
    return st.pid, seconds


def resume(cfg: Config, name: str) -> None:
    """The commit on the target: later dumps of the container must not leave it stopped (the
    driver resumes the stopped tasks themselves)."""
    conf = bundle_of(cfg, name) / "criu.conf"
    if conf.exists():
        private.write_atomic(conf, runtime(cfg).criu.config_file(leave_stopped=False))
