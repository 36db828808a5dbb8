"""What changed in a container's root filesystem against its image (pure).

A container started from an image writes into its own copy of the image's tree. What the
container changed (added, deleted and modified files, links, directories, FIFOs and device
nodes, their modes, owners and user.* extended attributes) is the part of its rootfs a move
must carry; the image itself is found on the target by content. Each change keeps the size
and sha256 of the content, so the target can prove what it applied, and its metadata, so the
target can prove that too.

Changes read on a target come from another host: `refusal` says what is wrong with one before
anything is written (paths leaving the rootfs, impossible owners, oversized attributes)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["file", "dir", "link", "fifo", "char", "block"]

#: Extended attributes carried: user.* only, what a program in the container sets on its own
#: files. security.*, trusted.* and system.* would let a manifest grant file capabilities or
#: rewrite ACLs on the target; they are neither read nor written.
XATTR_PREFIXES = ("user.",)
#: The kernel's own limits (XATTR_NAME_MAX, XATTR_SIZE_MAX).
XATTR_NAME_MAX = 255
XATTR_SIZE_MAX = 65536
#: Attributes per path a manifest may ask for (ext4 holds far fewer in one inode's block).
XATTRS_MAX = 128
#: The largest owner id: (uid_t)-1 means "leave unchanged" to chown(2).
ID_MAX = 2**32 - 2
#: PATH_MAX, for a symlink's target.
LINK_MAX = 4095
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HEX = re.compile(r"(?:[0-9a-f]{2})*")


@dataclass(frozen=True)
class Entry:
    """One path of a tree as a scan saw it."""

    kind: Kind
    mode: int
    size: int = 0
    sha256: str = ""
    #: A symlink's target.
    target: str = ""
    uid: int = 0
    gid: int = 0
    #: A device node's device number (st_rdev).
    rdev: int = 0
    #: (name, value as hex), sorted by name: only the carried namespaces (XATTR_PREFIXES).
    xattrs: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Change:
    #: Relative to the rootfs, no leading slash.
    path: str
    change: Literal["added", "modified", "deleted"]
    kind: Kind
    mode: int = 0
    size: int = 0
    sha256: str = ""
    target: str = ""
    #: The image file that holds a file's content (set when the change is exported).
    blob: str = ""
    uid: int = 0
    gid: int = 0
    rdev: int = 0
    xattrs: tuple[tuple[str, str], ...] = ()

    @property
    def entry(self) -> Entry:
        """What the path must be once the change is applied (not for deletions)."""
        return Entry(self.kind, self.mode, self.size, self.sha256, self.target, self.uid, self.gid, self.rdev,
                     self.xattrs)


def _key(path: str) -> tuple[str, ...]:
    # Parents sort before their children.
    return tuple(path.split("/"))


def changes(base: Mapping[str, Entry], now: Mapping[str, Entry]) -> tuple[Change, ...]:
    """Deletions first (only the top of a deleted subtree), then additions and modifications
    in path order, so applying them in order never writes below a path that is not there."""
    gone = sorted((p for p in base if p not in now), key=_key)
    deleted: list[str] = []
    for p in gone:
        if not any(p.startswith(d + "/") for d in deleted):
            deleted.append(p)
    out = [Change(p, "deleted", base[p].kind) for p in deleted]
    for p in sorted(now, key=_key):
        e = now[p]
        old = base.get(p)
        if old == e:
            continue
        out.append(Change(p, "added" if old is None else "modified", e.kind, e.mode, e.size, e.sha256, e.target,
                          uid=e.uid, gid=e.gid, rdev=e.rdev, xattrs=e.xattrs))
    return tuple(out)


def safe_path(path: str) -> bool:
    """A change's path from another host: relative, no `..`, no empty or dot parts."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and "\0" not in path


def carried_xattr(name: str) -> bool:
    return name.startswith(XATTR_PREFIXES)


def refusal(c: Change) -> str | None:
    """Why a change from another host must not be applied (None: it may). One line, naming
    the path (shortened: it is untrusted too)."""
    where = f"rootfs change {c.path[:200]!r}"
    if not safe_path(c.path):
        return f"{where}: not a plain relative path inside the rootfs"
    if c.change == "deleted":
        return None
    if not 0 <= c.mode <= 0o7777:
        return f"{where}: mode {c.mode:#o} is not a permission mode"
    if not (0 <= c.uid <= ID_MAX and 0 <= c.gid <= ID_MAX):
        return f"{where}: owner {c.uid}:{c.gid} is not a valid uid:gid"
    if c.kind == "file":
        if c.size < 0 or not _SHA256.fullmatch(c.sha256):
            return f"{where}: no valid size and sha256 for its content"
        if not c.blob.startswith("rootfs-") or "/" in c.blob or "\0" in c.blob:
            return f"{where}: its content is not in a rootfs-N image file"
    if c.kind == "link" and not (0 < len(c.target) <= LINK_MAX and "\0" not in c.target):
        return f"{where}: not a valid symlink target"
    if c.kind in ("char", "block") and not 0 <= c.rdev < 2**64:
        return f"{where}: device number {c.rdev} out of range"
    if c.xattrs and c.kind not in ("file", "dir"):
        return f"{where}: extended attributes on a {c.kind} (user.* is for files and directories only)"
    if len(c.xattrs) > XATTRS_MAX:
        return f"{where}: {len(c.xattrs)} extended attributes (at most {XATTRS_MAX})"
    for name, value in c.xattrs:
        if not carried_xattr(name) or len(name.encode()) > XATTR_NAME_MAX or "\0" in name:
            return f"{where}: extended attribute {name[:60]!r} is not a user.* name"
        if len(value) > 2 * XATTR_SIZE_MAX or not _HEX.fullmatch(value):
            return f"{where}: extended attribute {name[:60]!r} has no valid value of at most {XATTR_SIZE_MAX} bytes"
    if [n for n, _ in c.xattrs] != sorted({n for n, _ in c.xattrs}):
        return f"{where}: extended attributes repeated or out of order"
    return None


def refused(chs: tuple[Change, ...]) -> str | None:
    """The first change from another host that must not be applied, as the operator's line
    (None: all may be)."""
    for c in chs:
        why = refusal(c)
        if why:
            return f"refusing the container's rootfs changes: {why}"
    return None


def differences(want: Entry, got: Entry | None) -> list[str]:
    """How a path on disk (got; None: missing) differs from what a change made it (want):
    the names of the properties that differ, for the target's check."""
    if got is None:
        return ["missing"]
    if got.kind != want.kind:
        return [f"a {got.kind}, not a {want.kind}"]
    out = []
    if want.kind == "file" and (got.size, got.sha256) != (want.size, want.sha256):
        out.append("content")
    if want.kind == "link" and got.target != want.target:
        out.append("link target")
    if want.kind in ("char", "block") and got.rdev != want.rdev:
        out.append("device number")
    # A symlink's own mode is always 0777 and says nothing.
    if want.kind != "link" and got.mode != want.mode:
        out.append(f"mode {got.mode:#o} (want {want.mode:#o})")
    if (got.uid, got.gid) != (want.uid, want.gid):
        out.append(f"owner {got.uid}:{got.gid} (want {want.uid}:{want.gid})")
    if got.xattrs != want.xattrs:
        out.append("extended attributes")
    return out
