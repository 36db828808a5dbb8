"""The first program run inside a bed host, right after nsenter:

    python -m migrbed.hostexec CGROUP_DIR... -- PROGRAM [ARG...]

1. joins the host's cgroup (every DIR), so PROGRAM is inside it from its first instruction:
   nsenter cannot join a cgroup;
2. reopens standard streams that are /dev/null from inside the host's mount namespace: a
   /dev/null opened outside belongs to a mount the host does not have, and CRIU refuses to dump
   such a process ("Can't lookup mount=N for fd=0 path=/dev/null");
3. execs PROGRAM, which keeps the PID the caller got.

It imports nothing from migrd: it runs before every command started in a host.
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys

_DEV_NULL = os.makedev(1, 3)


def _reopen_null(fd: int) -> None:
    try:
        st = os.fstat(fd)
    except OSError:
        return  # closed: leave it closed
    if not stat.S_ISCHR(st.st_mode) or st.st_rdev != _DEV_NULL:
        return
    fresh = os.open("/dev/null", fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE)
    if fresh != fd:
        os.dup2(fresh, fd)
        os.close(fresh)


def main(argv: list[str]) -> None:
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        sys.exit("usage: python -m migrbed.hostexec CGROUP_DIR... -- PROGRAM [ARG...]")
    cut = argv.index("--")
    for d in argv[:cut]:
        try:
            with open(os.path.join(d, "cgroup.procs"), "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            sys.exit(f"migrd.hostexec: cannot join cgroup {d}: {e.strerror}")
    for fd in (0, 1, 2):
        _reopen_null(fd)
    try:
        os.execvp(argv[cut + 1], argv[cut + 1:])
    except OSError as e:
        sys.exit(f"migrd.hostexec: cannot run {argv[cut + 1]}: {e.strerror}")


if __name__ == "__main__":
    main(sys.argv[1:])
