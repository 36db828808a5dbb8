"""systemd's notify protocol (sd_notify(3)) without libsystemd: one datagram of
newline-separated KEY=VALUE assignments to the unix socket named by $NOTIFY_SOCKET (a path, or
an abstract name written with a leading '@'). Outside systemd the variable is unset and every
call is a no-op."""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


def message(**fields: object) -> str:
    """notify(READY=1, STATUS="...") payload: 'READY=1\\nSTATUS=...'. Values must be one line."""
    for k, v in fields.items():
        if "\n" in str(v):
            raise ValueError(f"sd_notify {k}: a value cannot contain a newline")
    return "\n".join(f"{k}={v}" for k, v in fields.items())


def address(env: Mapping[str, str] = os.environ) -> str | None:
    """The socket address from $NOTIFY_SOCKET ('@name' is the abstract '\\0name')."""
    addr = env.get("NOTIFY_SOCKET")
    if not addr:
        return None
    if addr[0] == "@":
        return "\0" + addr[1:]
    return addr


def watchdog_seconds(env: Mapping[str, str] = os.environ, pid: int | None = None) -> float | None:
    """The watchdog timeout systemd expects pings within ($WATCHDOG_USEC), None when off or
    meant for another process ($WATCHDOG_PID)."""
    usec = env.get("WATCHDOG_USEC")
    owner = env.get("WATCHDOG_PID")
    if not usec or (owner and int(owner) != (os.getpid() if pid is None else pid)):
        return None
    seconds = int(usec) / 1e6
    return seconds if seconds > 0 else None


def notify(env: Mapping[str, str] = os.environ, **fields: object) -> bool:
    """Send one notification; False when not run under systemd or the socket is gone (a
    missed notification must never stop the agent: systemd then restarts or times it out)."""
    addr = address(env)
    if addr is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message(**fields).encode())
        return True
    except OSError:
        return False
