"""The mount table as /proc/PID/mountinfo shows it (pure parsing; the caller reads the file)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple


class Mount(NamedTuple):
    fstype: str
    mountpoint: Path
    #: The directory of the filesystem that is mounted there (not "/" for bind mounts).
    root: str
    #: The filesystem's own (super block) options.
    options: frozenset[str]


def parse(text: str) -> list[Mount]:
    """Every mount in mountinfo text, in its order (a later one over the same point covers an
    earlier one)."""
    out = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        out.append(Mount(tail[0], Path(fields[4].replace("\\040", " ")), fields[3], frozenset(tail[2].split(","))))
    return out


def holding(mounts: list[Mount], path: Path) -> Mount | None:
    """The mount a path (absolute, without symlinks) lies on: the deepest mount point above it,
    the last one mounted there."""
    best = None
    for m in mounts:
        if path.is_relative_to(m.mountpoint) and (best is None or len(m.mountpoint.parts) >= len(best.mountpoint.parts)):
            best = m
    return best
