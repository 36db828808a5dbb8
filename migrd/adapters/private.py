"""Files and directories only root can read, whatever the umask.

A checkpoint holds all of a process's memory and its environment (passwords, keys, tokens),
and the journal and workload registry hold command lines and environments. Everything migrd
creates under its state directory, and every image directory, is therefore made 0700 (files
0600) here, explicitly: the modes are set on the new file descriptor or path, never by
changing the umask, which a restored process would otherwise inherit from whoever launched
CRIU. This is the one place that writes, fsyncs and renames.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from migrd.errors import NotPermitted

DIR_MODE = 0o700
FILE_MODE = 0o600


def missing_dirs(path: Path) -> Path:
    """Create the directories of path that do not exist yet, 0700; existing ones (/tmp, a
    user's directory a carried file lands in) are left exactly as they are."""
    _create(path)
    return path


def private_dir(path: Path) -> Path:
    """Create path (and any missing parents) 0700; an existing path is brought to 0700.

    Parents that already exist are left alone (/var/lib, /tmp); ones created here are
    migrd's own and are made 0700 too.
    """
    if not _create(path) and stat.S_IMODE(path.stat().st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE)
    return path


def _create(path: Path) -> bool:
    """Create path and its missing parents 0700; False when path existed already."""
    missing: list[Path] = []
    p = path
    while not p.exists():
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        try:
            os.mkdir(d, DIR_MODE)
        except FileExistsError:
            pass  # created concurrently (another migrctl); made 0700 just below
        os.chmod(d, DIR_MODE)
    return bool(missing)


def open_private(path: Path, flags: int) -> int:
    """os.open with O_CREAT and mode 0600 enforced on the descriptor (the umask could only
    have narrowed it, but an existing file may have been wider)."""
    fd = os.open(path, flags | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(path: Path, data: bytes | str, *, durable: bool = True) -> None:
    """Replace path with data so a reader sees the old or the new file, never half of one.
    durable: fsync the file and its directory (journals, manifests); off for files rewritten
    every few seconds whose loss costs nothing (the load snapshot)."""
    raw = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = open_private(tmp, os.O_WRONLY | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def restrict_files(directory: Path) -> None:
    """Make every regular file directly in directory ours and 0600 (CRIU writes its images
    0644 less the umask of whoever ran it, as the user it ran as)."""
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False):
            if entry.stat(follow_symlinks=False).st_uid != os.geteuid():
                os.chown(entry.path, os.geteuid(), os.getegid(), follow_symlinks=False)
            os.chmod(entry.path, FILE_MODE)


def repair_tree(top: Path) -> None:
    """Bring top and every directory below it to 0700 and every regular file to 0600 (what
    releases before private.py left 0755/0644 under a umask of 022). Symbolic links are
    neither followed nor changed; entries vanishing meanwhile (another migrctl) are skipped."""
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            _chmod_if(d, d.lstat().st_mode, DIR_MODE)
            entries = list(os.scandir(d))
        except FileNotFoundError:
            continue
        for e in entries:
            try:
                if e.is_dir(follow_symlinks=False):
                    stack.append(Path(e.path))
                elif e.is_file(follow_symlinks=False):
                    _chmod_if(Path(e.path), e.stat(follow_symlinks=False).st_mode, FILE_MODE)
            except FileNotFoundError:
                pass


def _chmod_if(path: Path, st_mode: int, mode: int) -> None:
    if stat.S_IMODE(st_mode) != mode:
        os.chmod(path, mode, follow_symlinks=False)


def secure_state_dir(state_dir: Path) -> None:
    """The state directory's own mode is the gate: found wider than 0700 (made by an older
    migrd under a umask of 022), the whole tree is repaired; at 0700 nothing below it is
    reachable by others, so the walk (tens of ms over thousands of CRIU logs, on every remote
    step of a migration) is skipped. A directory we do not own is not ours to repair; root
    refuses one another user owns, which could swap images root later restores."""
    try:
        st = state_dir.lstat()
    except FileNotFoundError:
        return  # created 0700 where first needed
    if st.st_uid != os.geteuid():
        if os.geteuid() == 0:
            raise NotPermitted(f"state directory {state_dir} is owned by uid {st.st_uid}, not root: "
                               f"another user could change what root restores; chown root it")
        return
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        repair_tree(state_dir)


def check_trusted_dir(path: Path, what: str) -> None:
    """Refuse a directory another user could change under root's feet: one not owned by us
    (root) or writable by group or others, or one inside a directory such a user could write
    (who can write the parent can rename the directory away and put another in its place;
    sticky directories like /tmp are fine). The manifest's hashes prove integrity only against
    accidents; whoever can write the directory can also rewrite the manifest."""
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        raise NotPermitted(f"{what} {path} is a symbolic link; name the directory itself")
    mode = stat.S_IMODE(st.st_mode)
    problems = []
    if st.st_uid != os.geteuid():
        problems.append(f"owned by uid {st.st_uid}, not {os.geteuid()}")
    if mode & 0o022:
        problems.append(f"mode {mode:04o} lets group or others write it")
    if problems:
        raise NotPermitted(f"{what} {path} is {' and '.join(problems)}: another user could swap "
                           f"its contents; use a directory only root can write (chown root, chmod 700)")
    absolute = Path(os.path.abspath(path))
    for parent in dict.fromkeys([*absolute.parents, *absolute.resolve().parents]):
        pst = parent.stat()
        pmode = stat.S_IMODE(pst.st_mode)
        if pst.st_uid not in (0, os.geteuid()) or (pmode & 0o022 and not pmode & stat.S_ISVTX):
            raise NotPermitted(f"{what} {path} is inside {parent} (uid {pst.st_uid}, mode {pmode:04o}), "
                               f"which another user could write: they could swap the whole directory; "
                               f"use one below directories only root can write")
