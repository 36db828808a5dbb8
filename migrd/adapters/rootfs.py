"""Root filesystem trees on disk: scan, export the changes into an image directory, apply
them to a copy of the image on the target (migrd/core/rootfs.py decides what changed and what
a change from another host may ask for)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
from pathlib import Path

from migrd.adapters import private
from migrd.core.rootfs import Change, Entry, Kind, carried_xattr, differences, refused
from migrd.errors import ImageError

_KINDS: dict[int, Kind] = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFIFO: "fifo",
                           stat.S_IFCHR: "char", stat.S_IFBLK: "block"}
_MAKE = {"fifo": stat.S_IFIFO, "char": stat.S_IFCHR, "block": stat.S_IFBLK}


def _sha256(path: Path) -> str:
    from migrd.engine.manifest import sha256_file

    return sha256_file(path)


def _xattrs(p: Path) -> tuple[tuple[str, str], ...]:
    try:
        names = os.listxattr(p, follow_symlinks=False)
    except OSError:  # a filesystem without extended attributes
        return ()
    return tuple(sorted((n, os.getxattr(p, n, follow_symlinks=False).hex()) for n in names if carried_xattr(n)))


def entry(p: Path) -> Entry | None:
    """What p is (None: missing, or a kind never carried: sockets)."""
    try:
        st = p.lstat()
    except FileNotFoundError:
        return None
    kind = _KINDS.get(stat.S_IFMT(st.st_mode))
    if kind is None:
        return None
    xattrs = _xattrs(p) if kind in ("file", "dir") else ()  # user.* exists on nothing else
    return Entry(kind, stat.S_IMODE(st.st_mode), st.st_size if kind == "file" else 0,
                 _sha256(p) if kind == "file" else "", os.readlink(p) if kind == "link" else "",
                 st.st_uid, st.st_gid, st.st_rdev if kind in ("char", "block") else 0, xattrs)


def scan(root: Path) -> dict[str, Entry]:
    """Every file, directory, symlink, FIFO and device node below root (root itself excluded).
    Sockets are left out: a bound socket's file is made again by whoever binds it."""
    out: dict[str, Entry] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            e = entry(p)
            if e is not None:
                out[str(p.relative_to(root))] = e
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
            c = dataclasses.replace(c, blob=blob)
        out.append(c)
    return tuple(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    elif p.exists() or p.is_symlink():
        p.unlink()


def _inside(rootfs: Path, c: Change) -> Path:
    dest = rootfs / c.path
    parent, root = dest.parent.resolve(), rootfs.resolve()
    if parent != root and root not in parent.parents:  # through a symlink in the tree
        raise ImageError(f"rootfs change {c.path[:200]!r} leads out of the rootfs")
    return dest


def _set_metadata(dest: Path, want: Entry, have: Entry | None) -> None:
    """Owner, then mode (chown clears set-id bits), then the carried extended attributes."""
    os.chown(dest, want.uid, want.gid, follow_symlinks=False)
    if want.kind == "link":
        return
    os.chmod(dest, want.mode)
    if want.kind not in ("file", "dir"):
        return
    wanted = dict(want.xattrs)
    for name, _ in have.xattrs if have else ():
        if name not in wanted:
            os.removexattr(dest, name, follow_symlinks=False)
    for name, value in want.xattrs:
        os.setxattr(dest, name, bytes.fromhex(value), follow_symlinks=False)


def _apply_one(rootfs: Path, c: Change, images: Path) -> None:
    dest = _inside(rootfs, c)
    if c.change == "deleted":
        _remove(dest)
        return
    want, have = c.entry, entry(dest)
    if have == want:
        return  # already so: a path a restored process may hold open is left alone
    remade = have is None or have.kind != want.kind or bool(
        {"content", "link target", "device number"} & set(differences(want, have)))
    if remade:
        if have is not None:
            _remove(dest)
            have = None
        if want.kind == "dir":
            dest.mkdir()
        elif want.kind == "link":
            os.symlink(want.target, dest)
        elif want.kind == "file":
            shutil.copyfile(images / c.blob, dest)
            if _sha256(dest) != want.sha256:
                raise ImageError(f"{c.path} was not applied intact (sha256 mismatch)")
        else:
            os.mknod(dest, want.mode | _MAKE[want.kind], want.rdev)
    _set_metadata(dest, want, have)


def apply(rootfs: Path, chs: tuple[Change, ...], images: Path) -> None:
    """Make rootfs what the source's was; every change is checked before any is applied, every
    file's content against its sha256 after it is written. A path that is already what its
    change says is left as it is."""
    why = refused(chs)
    if why:
        raise ImageError(why)
    for c in chs:
        try:
            _apply_one(rootfs, c, images)
        except OSError as e:
            raise ImageError(f"rootfs change {c.path[:200]!r} could not be applied: {e.strerror or e}") from None


def check(rootfs: Path, chs: tuple[Change, ...]) -> list[str]:
    """The changes rootfs does not show (empty: every one is there, content and metadata
    checked)."""
    wrong = []
    for c in chs:
        p = rootfs / c.path
        if c.change == "deleted":
            if p.exists() or p.is_symlink():
                wrong.append(f"{c.path} should be deleted")
            continue
        diff = differences(c.entry, entry(p))
        if diff:
            wrong.append(f"{c.path}: {', '.join(diff)}")
    return wrong


def _copy_entry(src: str, dst: str) -> None:
    st = os.lstat(src)
    if stat.S_ISREG(st.st_mode):
        shutil.copy2(src, dst)
    else:  # an image's FIFOs and device nodes
        os.mknod(dst, st.st_mode, st.st_rdev)
        shutil.copystat(src, dst)


def copy_image(image: Path, rootfs: Path) -> None:
    """A container's own copy of the image tree: symlinks kept as links, special files made
    again, modes, extended attributes and owners kept (so the copy scans as the image does)."""
    private.private_dir(rootfs.parent)
    shutil.copytree(image, rootfs, symlinks=True, copy_function=_copy_entry)
    for dirpath, dirnames, filenames in os.walk(image):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            os.chown(rootfs / p.relative_to(image), st.st_uid, st.st_gid, follow_symlinks=False)
