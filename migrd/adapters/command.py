"""The one place migrd starts programs. Argv lists only, never a shell string; every argv is
logged at debug level so `-v` shows exactly what ran."""

from __future__ import annotations

import logging
import os
import shlex
import subprocess
from collections.abc import Mapping, Sequence
from typing import IO, Any

from migrd.errors import CommandError

log = logging.getLogger(__name__)


def _describe(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = 60,
    input: bytes | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    pass_fds: Sequence[int] = (),
) -> subprocess.CompletedProcess[bytes]:
    """Run argv to completion, capturing stdout/stderr as bytes.

    With check=True a non-zero exit raises CommandError carrying the program's last stderr line,
    which is what an operator needs to see first.
    """
    argv = [os.fspath(a) for a in argv]
    log.debug("run: %s", _describe(argv))
    try:
        cp = subprocess.run(
            argv,
            input=input,
            stdin=None if input is not None else subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            pass_fds=tuple(pass_fds),
        )
    except FileNotFoundError as e:
        raise CommandError(f"{argv[0]}: program not found (is it installed?)") from e
    except subprocess.TimeoutExpired as e:
        raise CommandError(f"{argv[0]} did not finish within {timeout:g} s") from e
    if check and cp.returncode != 0:
        raise CommandError(f"{_describe(argv[:3])}... exited {cp.returncode}: {last_line(cp.stderr)}")
    return cp


def spawn(
    argv: Sequence[str],
    *,
    stdout: int | IO[Any] | None = subprocess.DEVNULL,
    stderr: int | IO[Any] | None = subprocess.DEVNULL,
    env: Mapping[str, str] | None = None,
    new_session: bool = True,
    pass_fds: Sequence[int] = (),
    stdin: int | None = subprocess.DEVNULL,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[bytes]:
    """Start argv in the background (own session by default) and return the Popen.
    stdin=None inherits ours (a foreground command run on the operator's behalf)."""
    argv = [os.fspath(a) for a in argv]
    log.debug("spawn: %s", _describe(argv))
    try:
        return subprocess.Popen(
            argv,
            stdin=stdin,
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            start_new_session=new_session,
            pass_fds=tuple(pass_fds),
            cwd=cwd,
        )
    except FileNotFoundError as e:
        raise CommandError(f"{argv[0]}: program not found (is it installed?)") from e


def last_line(data: bytes | str) -> str:
    text = data.decode(errors="replace") if isinstance(data, bytes) else data
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"
