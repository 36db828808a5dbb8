"""Podman containers on this host: create, describe, checkpoint and restore with their rootfs
changes.

Podman's exported checkpoint carries a rootfs diff, but it misses files modified in place (a
file appended to came back with the image's content: measured with Podman 4.3.1). So migrd
carries the whole diff itself, like a runc container's: the container's rootfs (`podman
mount`) against the image tree, every change with its size and sha256 in the manifest, applied
into the restored container while it waits, stopped, for the commit.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path
from typing import Any

from migrd.adapters import podman, private, procinfo, rootfs
from migrd.adapters.criu import find_criu
from migrd.config import Config
from migrd.core import rootfs as rootfs_core
from migrd.engine import checkpoint as cp
from migrd.engine import containers, failpoints
from migrd.engine import manifest as mf
from migrd.errors import ContainerError, ImageError, InputError, MigrdError
from migrd.model import ContainerInfo, ProcessInfo

RUNTIME = "podman"
#: The exported checkpoint inside the image directory.
ARCHIVE = "podman-checkpoint.tar"


def runtime(cfg: Config) -> podman.Podman:
    return podman.find_podman(cfg.state_dir / "podman", find_criu(cfg))


def image_ref(image: str) -> str:
    return f"localhost/migrd-{image}:latest"


def ensure_image(pm: podman.Podman, image: str) -> str | None:
    """The image's ID in this host's storage, loaded from the shared archive when missing
    (None: no such image here)."""
    found = pm.image_id(image_ref(image))
    archive = containers.image_root(image).parent / "podman.tar"
    if found is None and archive.is_file():
        pm.load(archive)
        found = pm.image_id(image_ref(image))
    return found


def create(cfg: Config, name: str, args: list[str], image: str = "busybox", migratable: bool = True) -> podman.State:
    containers.check_name(name)
    pm = runtime(cfg)
    if pm.state(name) is not None:
        raise ContainerError(f"container {name} exists on this host")
    if ensure_image(pm, image) is None:
        raise ContainerError(f"no podman image {image} here: run `make setup`")
    try:
        return pm.run(name, image_ref(image), args, migratable=migratable, image_name=image)
    except BaseException:
        pm.remove(name)
        raise


def exists(cfg: Config, name: str) -> bool:
    try:
        return runtime(cfg).state(name) is not None
    except MigrdError:
        return False


def describe(cfg: Config, name: str) -> tuple[ContainerInfo, ProcessInfo]:
    containers.check_name(name)
    st = runtime(cfg).state(name)
    if st is None:
        raise InputError(f"no container {name} on this host")
    if st.status != "running" or not st.pid:
        raise InputError(f"container {name} is {st.status}, not running")
    image = st.annotations.get(podman.IMAGE)
    if not image:
        raise ContainerError(f"container {name} was not made from a migrd image (no {podman.IMAGE} annotation)")
    digest = containers.image_digest(image)
    if digest is None:
        raise ContainerError(f"container {name}: its image {image} is not here ({containers.image_root(image)})")
    return ContainerInfo(name, RUNTIME, image, digest, "", {}, st.labels.get(podman.MIGRATABLE) == "true",
                         st.image_id), procinfo.inspect(st.pid)


def listing(cfg: Config) -> list[dict[str, Any]]:
    try:
        pm = runtime(cfg)
        states = [s for s in map(pm.state, pm.names()) if s is not None]
    except MigrdError:
        return []
    return [{"kind": "container", "runtime": RUNTIME, "name": s.name, "pid": s.pid, "status": s.status,
             "alive": s.status == "running", "image": s.annotations.get(podman.IMAGE),
             "migratable": s.labels.get(podman.MIGRATABLE) == "true"} for s in states]


def _changes(pm: podman.Podman, name: str, image: str) -> tuple[Path, tuple[rootfs_core.Change, ...]]:
    merged = pm.mount(name)
    return merged, rootfs_core.changes(rootfs.scan(containers.image_root(image)), rootfs.scan(merged))


def inventory(images: Path) -> bytes | None:
    """CRIU's inventory.img inside the exported checkpoint (None: no export yet)."""
    try:
        with tarfile.open(images / ARCHIVE) as tar:
            member = next((m for m in tar if m.isfile() and m.name.removeprefix("./") == "checkpoint/inventory.img"),
                          None)
            f = tar.extractfile(member) if member is not None else None
            return f.read() if f is not None else None
    except (OSError, tarfile.TarError):
        return None


def checkpoint(cfg: Config, c: ContainerInfo, info: ProcessInfo, images: Path, *,
               tcp_established: bool = False) -> cp.Checkpoint:
    private.private_dir(images)
    pm = runtime(cfg)
    try:
        with failpoints.dying_while("dumping"):
            seconds = pm.checkpoint(c.name, images / ARCHIVE, tcp_established=tcp_established)
        failpoints.point("dumped")
        if containers.image_digest(c.image) != c.image_digest:
            raise ImageError(f"image {c.image} changed here during the migration")
        merged, found = _changes(pm, c.name, c.image)
        try:
            changes = rootfs.export(merged, found, images)
        finally:
            pm.unmount(c.name)
        private.restrict_files(images)
        m = cp.write_manifest(cfg, find_criu(cfg), images, info, {"tcp_established": tcp_established},
                              subject=RUNTIME, container=c, rootfs=changes)
    except BaseException:
        shutil.rmtree(images, ignore_errors=True)
        raise
    return cp.Checkpoint(m, images, seconds, images / ARCHIVE)


def restore(cfg: Config, images: Path, *, hashed: bool) -> tuple[int, float]:
    """A target: import the exported checkpoint stopped (CRIU's leave-stopped through the
    container's CRIU config file), then make its rootfs what the source's was."""
    m = mf.verify(images, hashes=not hashed)
    c = m.container
    if c is None:
        raise ImageError(f"{images} holds no container")
    why = rootfs_core.refused(m.rootfs)
    if why:  # before Podman imports anything
        raise ImageError(why)
    pm = runtime(cfg)
    if ensure_image(pm, c.image) != c.image_id or containers.image_digest(c.image) != c.image_digest:
        raise ContainerError(f"podman image {c.image} here is missing or differs from the source's")
    try:
        try:
            private.write_atomic(pm.criu_config(c.name), pm.criu.config_file(leave_stopped=True))
        except OSError as e:
            raise ContainerError(f"cannot prepare the restore of container {c.name}: "
                                 f"{pm.criu_config(c.name)}: {e.strerror}") from None
        seconds = pm.restore(c.name, images / ARCHIVE, tcp_established=bool(m.options.get("tcp_established")))
        merged = pm.mount(c.name)
        try:
            rootfs.apply(merged, m.rootfs, images)
            wrong = rootfs.check(merged, m.rootfs)
        finally:
            pm.unmount(c.name)
        if wrong:
            raise ImageError(f"container {c.name}: rootfs changes not applied: {'; '.join(wrong[:3])}")
        st = pm.state(c.name)
        if st is None or not st.pid:
            raise ContainerError(f"container {c.name} is not there after its restore")
    except BaseException:
        pm.remove(c.name)
        raise
    finally:
        private.restrict_files(images)
    return st.pid, seconds


def restore_local(cfg: Config, c: ContainerInfo, tcp_established: bool) -> int:
    """A rollback: the source's container, exited by the dump, from its kept local checkpoint
    (its rootfs never changed since)."""
    pm = runtime(cfg)
    private.write_atomic(pm.criu_config(c.name), pm.criu.config_file(leave_stopped=False))
    pm.restore(c.name, None, tcp_established=tcp_established)
    st = pm.state(c.name)
    if st is None or not st.pid:
        raise ContainerError(f"container {c.name} is not there after its restore")
    return st.pid


def resume(cfg: Config, name: str) -> None:
    pm = runtime(cfg)
    conf = pm.criu_config(name)
    if conf.exists():
        private.write_atomic(conf, pm.criu.config_file(leave_stopped=False))


def remove(cfg: Config, name: str) -> None:
    runtime(cfg).remove(name)
