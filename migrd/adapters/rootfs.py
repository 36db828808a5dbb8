"""Root filesystem trees on disk: scan, export the changes into an image directory, apply
them to a copy of the image on the target (migrd/core/rootfs.py decides what changed)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

from migrd.adapters import private
from migrd.core.rootfs import Change, Entry, safe_path
from migrd.errors import ImageError


def _sha256(path: Path) -> str:
    from migrd.engine.manifest import sha256_file

    return sha256_file(path)


def scan(root: Path) -> dict[str, Entry]:
    """Every file, directory and symlink below root (root itself excluded). Special files
    (devices, FIFOs, sockets) are left out: runc mounts /dev and friends itself."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            rel = str(p.relative_to(root))
            st = p.lstat()
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = Entry("link", mode, target=os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = Entry("dir", mode)
            elif stat.S_ISREG(st.st_mode):
                out[rel] = Entry("file", mode, st.st_size, _sha256(p))
    return out


def export(rootfs: Path, chs: tuple[Change, ...], images: Path) -> tuple[Change, ...]:
    """Copy the content of every added or modified file into images as rootfs-N (the image
    directory is flat); returns the changes with their blob names. Fails if a file changed
    since the scan (the container must be stopped)."""
    out = []
    for i, c in enumerate(chs):
        if c.kind == "file" and c.change != "deleted":
            blob = f"rootfs-{i:06d}"
            shutil.copyfile(rootfs / c.path, images / blob, follow_symlinks=False)
            os.chmod(images / blob, 0o600)
            if _sha256(images / blob) != c.sha256:
                raise ImageError(f"{c.path} changed in the container's rootfs while it was copied")
            c = Change(c.path, c.change, c.kind, c.mode, c.size, c.sha256, c.target, blob)
        out.append(c)
    return tuple(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def apply(rootfs: Path, chs: tuple[Change, ...], images: Path) -> None:
    """Make rootfs (a fresh copy of the image) what the source's was; every file's content is
    checked against its sha256 after it is written."""
    for c in chs:
        if not safe_path(c.path) or (c.blob and not c.blob.startswith("rootfs-")) or "/" in c.blob:
            raise ImageError(f"refusing a rootfs change {c.path!r}")
        dest = rootfs / c.path
        parent, root = dest.parent.resolve(), rootfs.resolve()
        if parent != root and root not in parent.parents:  # through a symlink in the tree
            raise ImageError(f"rootfs change {c.path!r} leads out of the rootfs")
        if c.change == "deleted":
            _remove(dest)
            continue
        if c.kind == "dir":
            if not dest.is_dir() or dest.is_symlink():
                _remove(dest)
                dest.mkdir()
            os.chmod(dest, c.mode)
        elif c.kind == "link":
            _remove(dest)
            os.symlink(c.target, dest)
        else:
            _remove(dest)
            shutil.copyfile(images / c.blob, dest)
            os.chmod(dest, c.mode)
            if _sha256(dest) != c.sha256:
                raise ImageError(f"{c.path} was not applied intact (sha256 mismatch)")


def check(rootfs: Path, chs: tuple[Change, ...]) -> list[str]:
    """The changes rootfs does not show (empty: every one is there, content checked)."""
    wrong = []
    for c in chs:
        p = rootfs / c.path
        if c.change == "deleted":
            if p.exists() or p.is_symlink():
                wrong.append(f"{c.path} should be deleted")
        elif c.kind == "file" and (not p.is_file() or p.is_symlink() or _sha256(p) != c.sha256):
            wrong.append(f"{c.path} differs")
        elif c.kind == "link" and (not p.is_symlink() or os.readlink(p) != c.target):
            wrong.append(f"{c.path} is not a link to {c.target}")
        elif c.kind == "dir" and not p.is_dir():
            wrong.append(f"{c.path} is not a directory")
    return wrong


def copy_image(image: Path, rootfs: Path) -> None:
    """A container's own copy of the image tree (symlinks kept as links, modes kept)."""
    private.private_dir(rootfs.parent)
    shutil.copytree(image, rootfs, symlinks=True)
