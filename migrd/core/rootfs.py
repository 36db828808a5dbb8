"""What changed in a container's root filesystem against its image (pure).

A container started from an image writes into its own copy of the image's tree. What the
container changed (added, deleted and modified files, links and directories) is the part of
its rootfs a move must carry; the image itself is found on the target by content. Each change
keeps the size and sha256 of the content, so the target can prove what it applied."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Kind = Literal["file", "dir", "link"]


@dataclass(frozen=True)
class Entry:
    """One path of a tree as a scan saw it."""

    kind: Kind
    mode: int
    size: int = 0
    sha256: str = ""
    #: A symlink's target.
    target: str = ""


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
        if old == e or (old is not None and old.kind == e.kind == "dir" and old.mode == e.mode):
            continue
        out.append(Change(p, "added" if old is None else "modified", e.kind, e.mode, e.size, e.sha256, e.target))
    return tuple(out)


def safe_path(path: str) -> bool:
    """A change's path from another host: relative, no `..`, no empty or dot parts."""
    parts = path.split("/")
    return bool(path) and not path.startswith("/") and all(p not in ("", ".", "..") for p in parts) \
        and "\0" not in path
