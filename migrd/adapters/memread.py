"""Reading a running process's memory (root): the regions CRIU would dump, page by page.

CRIU dumps a process's anonymous and written private pages and its shared anonymous memory,
never clean file-backed pages. What pre-copy reads ahead is only a cache of content for the
target (the final dump is the truth), so reading a little more than CRIU keeps costs bytes,
never correctness: every writable mapping is read, plus anonymous ones; [vvar]-like kernel
areas and unreadable mappings are not.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

PAGE = 4096
CHUNK = 1 << 20
_ZERO = bytes(PAGE)
_KERNEL_AREAS = ("[vvar]", "[vvar_vclock]", "[vdso]", "[vsyscall]")


@dataclass(frozen=True)
class Region:
    start: int
    end: int
    path: str


def parse_maps(text: str) -> list[Region]:
    """The regions of /proc/PID/maps worth reading ahead (pure)."""
    out = []
    for line in text.splitlines():
        fields = line.split(None, 5)
        if len(fields) < 5:
            continue
        span, perms = fields[0], fields[1]
        path = fields[5].strip() if len(fields) == 6 else ""
        if perms[0] != "r" or path in _KERNEL_AREAS:
            continue
        if perms[1] != "w" and path and not path.startswith("[") and not path.startswith("/memfd:"):
            continue  # read-only file pages: CRIU does not dump them
        start, end = (int(x, 16) for x in span.split("-"))
        out.append(Region(start, end, path))
    return out


def regions(pid: int) -> list[Region]:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return parse_maps(f.read())
    except OSError:
        return []  # the task ended: nothing of it to read


def pages(pid: int) -> Iterator[tuple[int, bytes]]:
    """(address, page) for every readable page of pid's dumpable regions; regions that vanish
    or cannot be read while the process runs are skipped. Pages are bytes: the callers compare
    them, and comparing memoryviews goes item by item, far slower than bytes' memcmp."""
    try:
        fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        for r in regions(pid):
            at = r.start
            while at < r.end:
                try:
                    data = os.pread(fd, min(CHUNK, r.end - at), at)
                except OSError:
                    break
                if not data:
                    break
                for off in range(0, len(data) - PAGE + 1, PAGE):
                    yield at + off, data[off:off + PAGE]
                at += len(data)
    finally:
        os.close(fd)


def sample(pids: Iterable[int], stride: int, phase: int, deadline: float) -> dict[tuple[int, int], bytes] | None:
    """A digest of every page whose page number is `phase` modulo `stride` in the tasks'
    dumpable regions (b"" for an all-zero page), one small read each, so the cost is the pages
    sampled, not the memory. Choosing by address keeps the same pages when regions come and go.
    None once time.monotonic() passes `deadline` (the caller's budget): a partial read
    would compare only part of the memory."""
    out: dict[tuple[int, int], bytes] = {}
    step = stride * PAGE
    for pid in pids:
        try:
            fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue  # ended: it rewrites nothing
        try:
            for r in regions(pid):
                at = (r.start - phase * PAGE + step - 1) // step * step + phase * PAGE
                while at < r.end:
                    if time.monotonic() > deadline:
                        return None
                    try:
                        page = os.pread(fd, PAGE, at)
                    except OSError:
                        break
                    out[pid, at] = b"" if page == _ZERO else hashlib.sha1(page).digest()
                    at += step
        finally:
            os.close(fd)
    return out
