"""manifest.json: what a checkpoint directory holds and how it was made.

Every image file is listed with size and sha256, so a restore (and the receiver of a transfer)
can refuse a directory that is incomplete, padded or altered before CRIU ever reads it. The
process description lets a target check in advance whether a restore can work (open files,
ports) and lets an operator see what an image is.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from migrd.adapters import private, untrusted
from migrd.errors import ImageError, MigrdError
from migrd.core.rootfs import Change
from migrd.model import ContainerInfo, ProcessInfo

NAME = "manifest.json"
#: CRIU's link from a dump to the images of the pre-dump before it: not an image file, and
#: never sent (the receiving side links its own copy of the chain; migrd.engine.predump).
PARENT_LINK = "parent"
#: The longest chain of pre-dumps a manifest may name (far above any round limit).
MAX_PARENTS = 64
FORMAT = 1
_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileEntry:
    size: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    format: int
    created: float
    criu_version: str
    host: str
    process: ProcessInfo
    #: CRIU options the dump used that restore must repeat (tcp_established, shell_job, ...).
    options: dict[str, Any]
    files: dict[str, FileEntry]
    #: What the images hold (migrd.engine.subjects.SUBJECTS): a process tree or a container.
    subject: str = "process"
    #: For a container: which one, its bundle's config and image.
    container: ContainerInfo | None = None
    #: For a container: what its rootfs changed against the image, each file's content in an
    #: image file (Change.blob) with its size and sha256.
    rootfs: tuple[Change, ...] = ()
    #: Pre-dumps these images lean on (CRIU's `parent` chain): their pages are not in files.
    parents: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @property
    def image_bytes(self) -> int:
        return sum(f.size for f in self.files.values())


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def scan(directory: Path) -> dict[str, FileEntry]:
    """Hash every regular file directly in directory except the manifest itself and CRIU's
    link to a pre-dump.

    CRIU image directories are flat; anything else (subdirectory, link, device) is refused
    because the receiver would refuse it anyway.
    """
    entries: dict[str, FileEntry] = {}
    for entry in sorted(os.scandir(directory), key=lambda e: e.name):
        if entry.name == NAME or is_parent_link(entry):
            continue
        if not entry.is_file(follow_symlinks=False):
            raise ImageError(f"{directory}: {entry.name} is not a regular file; images must be flat")
        p = Path(entry.path)
        entries[entry.name] = FileEntry(p.stat().st_size, sha256_file(p))
    return entries


def is_parent_link(entry: os.DirEntry[str]) -> bool:
    return entry.name == PARENT_LINK and entry.is_symlink()


def write(directory: Path, manifest: Manifest) -> Path:
    path = directory / NAME
    # Not durable: the image files beside it are not fsync'd either (the source keeps the
    # process until the target's restore worked), and on ext4 an fsync here could force the
    # just-written pages to disk inside the freeze.
    private.write_atomic(path, manifest.to_json(), durable=False)
    return path


def process_from_dict(raw: Any, error: type[MigrdError] = ImageError, origin: str = NAME) -> ProcessInfo:
    return untrusted.build(ProcessInfo, raw, error, origin)


def from_json(text: str | bytes, origin: str = NAME) -> Manifest:
    """The manifest in text; ImageError naming origin for anything that is not one."""
    invalid = f"{origin} is not a valid migrd manifest"
    raw = untrusted.loads(text, ImageError, invalid)
    if not isinstance(raw, dict):
        raise ImageError(f"{invalid}: expected an object, got {untrusted.short(raw)}")
    if raw.get("format") != FORMAT:
        raise ImageError(f"{origin}: unsupported manifest format {untrusted.short(raw.get('format'))} "
                         f"(expected {FORMAT})")
    m = untrusted.build(Manifest, raw, ImageError, invalid)
    for name, entry in m.files.items():
        if entry.size < 0:
            raise ImageError(f"{origin}: image file {name!r} has a negative size")
    if not 0 <= m.parents <= MAX_PARENTS:
        raise ImageError(f"{origin}: {m.parents} pre-dumps is not between 0 and {MAX_PARENTS}")
    return m


def read(directory: Path) -> Manifest:
    path = directory / NAME
    if not directory.is_dir():
        raise ImageError(f"{directory} is not a directory")
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise ImageError(f"{directory} is not a migrd checkpoint (no {NAME})") from None
    return from_json(text, str(path))


def check_name(name: str) -> None:
    """Names in a manifest must be plain file names: no path separators, no dot names."""
    if not name or "/" in name or "\0" in name or name in (".", "..") or name == NAME:
        raise ImageError(f"manifest lists an illegal file name {name!r}")


def compare(expected: dict[str, FileEntry], actual: dict[str, FileEntry], where: str) -> None:
    """Raise ImageError naming the first missing, extra or altered file (pure)."""
    for name in sorted(expected):
        check_name(name)
        if name not in actual:
            raise ImageError(f"{where}: image file {name} is missing")
    for name in sorted(actual):
        if name not in expected:
            raise ImageError(f"{where}: unexpected file {name} is not in the manifest")
    for name in sorted(expected):
        e, a = expected[name], actual[name]
        if e.size != a.size:
            raise ImageError(f"{where}: image file {name} has size {a.size}, manifest says {e.size}")
        if e.sha256 != a.sha256:
            raise ImageError(f"{where}: image file {name} was altered (sha256 mismatch)")


def verify(directory: Path, hashes: bool = True, streamed: Mapping[str, int] | None = None) -> Manifest:
    """Read the manifest and check the directory against it; return it when all matches.

    hashes=False checks names and sizes only, for a directory whose every byte was hashed
    moments ago as it was written (the transfer receiver does that). streamed: page images a
    page server wrote here during the dump (name -> size); the source never had them as files,
    so the manifest cannot list them: they are checked by name and size."""
    m = read(directory)
    expected = dict(m.files)
    for name, size in (streamed or {}).items():
        check_name(name)
        if name in expected:
            raise ImageError(f"{directory}: streamed page image {name} is also in the manifest")
        expected[name] = FileEntry(size, "")
    if hashes:
        actual = scan(directory)
    else:
        actual = {e.name: FileEntry(e.stat().st_size, expected[e.name].sha256 if e.name in expected else "")
                  for e in os.scandir(directory) if e.name != NAME and not is_parent_link(e)}
    for name in streamed or {}:
        if name in actual:
            actual[name] = FileEntry(actual[name].size, "")
    compare(expected, actual, str(directory))
    return m
