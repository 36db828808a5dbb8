"""Pre-copy with CRIU's own pre-dumps, on kernels with soft-dirty tracking.

Round N is `criu pre-dump --track-mem` into predump/N while the workload runs: round 1 holds
every page, each later round only the pages written since the round before (CRIU links
predump/N/parent to ../N-1). Each round crosses as a checkpoint directory of its own (manifest,
the receiver's checks) into the target's incoming/ID/predump/N. At the freeze `criu dump
--track-mem --prev-images-dir ../predump/N` writes only the pages written since the last round,
and CRIU's restore reads every page from the newest image of the chain that holds it.

The receiver writes regular files only, never links, so the target links its copy of the chain
itself (`link_chain`), from the depth the final manifest names. The layout is the same on both
sides (images/ beside predump/), so the same relative links serve the source's rollback and the
target's restore.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from migrd.engine import manifest as mf
from migrd.engine.checkpoint import Parent
from migrd.engine.precopy import is_page_image
from migrd.errors import ImageError

#: The directory, beside a migration's images, that holds its pre-dumps.
CHAIN = "predump"


def round_dir(chain: Path, number: int) -> Path:
    return chain / str(number)


def remote_round_dir(remote_images: str, number: int) -> str:
    """Where round `number` goes on the target, beside the images it will receive."""
    return str(PurePosixPath(remote_images).parent / CHAIN / str(number))


def round_parent(number: int) -> Parent | None:
    """What pre-dump `number` leans on: the one before it (the first leans on nothing)."""
    return Parent(f"../{number - 1}", number - 1) if number > 1 else None


def final_parent(depth: int) -> Parent:
    """What the freeze's dump leans on after `depth` pre-dumps: the last of them."""
    return Parent(f"../{CHAIN}/{depth}", depth)


def page_bytes(images: Path) -> int:
    """Bytes of memory pages a dump or pre-dump holds (its pages-*.img)."""
    return sum(e.stat().st_size for e in os.scandir(images) if is_page_image(e.name) and e.is_file())


def link_chain(images: Path, depth: int) -> None:
    """On the target, before the restore: check that every pre-dump the images lean on arrived
    whole, and link them as CRIU's dump linked them on the source. Idempotent (a restore may be
    asked again)."""
    chain = images.parent / CHAIN
    links: list[tuple[Path, Parent]] = []
    for number in range(1, depth + 1):
        here = round_dir(chain, number)
        m = mf.verify(here, hashes=False)  # the receiver hashed every byte as it wrote it
        if m.parents != number - 1:
            raise ImageError(f"{here}: pre-dump {number} leans on {m.parents} pre-dumps, expected {number - 1}")
        parent = round_parent(number)
        if parent is not None:
            links.append((here, parent))
    links.append((images, final_parent(depth)))
    for where, parent in links:
        link = where / mf.PARENT_LINK
        if os.path.lexists(link):
            if not link.is_symlink() or os.readlink(link) != parent.link:
                raise ImageError(f"{link} exists and is not the link to {parent.link}")
            continue
        os.symlink(parent.link, link)
