"""The agent's admin API: a unix stream socket (mode 0600 in a 0700 directory: root only)
speaking line-delimited JSON. Each request is one line `{"op": "status", ...args}`, each
answer one line `{"ok": true, "result": ...}` or `{"ok": false, "error": "one line"}`.
A client may send several requests on one connection.

Operations (see migrd.agent.Agent.handle): status, hosts, ps, explain [pid], history, pause,
resume, offer (requester) -- the last is how a peer's `migrctl peer offer` asks for work.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from migrd.adapters import untrusted
from migrd.errors import AgentNotRunning, InputError, MigrdError

log = logging.getLogger(__name__)
#: A request line longer than this is refused (the protocol's requests are tiny).
MAX_LINE = 64 << 10

Handler = Callable[[dict[str, Any]], Any]


def encode(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def decode_request(line: bytes) -> dict[str, Any]:
    """Parse one request line; InputError names what is wrong with it."""
    req = untrusted.loads(line, InputError, "request")
    if not isinstance(req, dict) or not isinstance(req.get("op"), str):
        raise InputError('request must be an object with a string "op"')
    return req


def answer(handler: Handler, line: bytes) -> dict[str, Any]:
    """The response to one request line: the handler's result, or its MigrdError as text.
    Every request gets an answer, even one that hits a bug in the agent."""
    try:
        return {"ok": True, "result": handler(decode_request(line))}
    except MigrdError as e:
        return {"ok": False, "error": str(e), "code": e.exit_code}
    except Exception as e:
        log.exception("admin request failed")
        return {"ok": False, "error": f"internal error in the agent ({type(e).__name__}); see its log",
                "code": MigrdError.exit_code}


def decode_response(line: bytes) -> Any:
    """The result of a response line; an error response becomes a MigrdError."""
    resp = untrusted.loads(line, MigrdError, "the agent's answer")
    if not isinstance(resp, dict):
        raise MigrdError("the agent sent a malformed answer")
    if not resp.get("ok"):
        err = MigrdError(f"agent: {resp.get('error', 'unknown error')}")
        code = resp.get("code")
        # the agent's error class's code
        err.exit_code = code if isinstance(code, int) and not isinstance(code, bool) else MigrdError.exit_code
        raise err
    return resp.get("result")


class Server:
    """Accepts connections on a thread; each connection is served on its own short thread."""

    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self.sock = _listen(path)
        self._thread = threading.Thread(target=self._accept, name="admin", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        try:
            if stat.S_ISSOCK(self.path.lstat().st_mode):
                self.path.unlink()
        except FileNotFoundError:
            pass

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rf:
            conn.settimeout(30)
            try:
                while line := rf.readline(MAX_LINE + 1):
                    if len(line) > MAX_LINE:
                        conn.sendall(encode({"ok": False, "error": "request too long"}))
                        return
                    conn.sendall(encode(answer(self.handler, line)))
            except OSError:
                return


def _listen(path: Path) -> socket.socket:
    """Bind the socket, refusing if another agent answers there; a stale socket is replaced."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise MigrdError(f"{path} exists and is not a socket; remove it or set daemon.socket")
        try:
            request(path, "status", timeout=2)
        except AgentNotRunning:
            path.unlink()
        else:
            raise MigrdError(f"another migrd agent is already running (it answers on {path})")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket is created 0600: no window where others may connect
    try:
        s.bind(str(path))
    finally:
        os.umask(old)
    s.listen(16)
    return s


def request(path: Path, op: str, timeout: float = 30, **args: Any) -> Any:
    """Ask the agent listening on path; AgentNotRunning when nothing answers there."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    with s:
        try:
            s.connect(str(path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentNotRunning(f"no migrd agent answers on {path} (is `migrd` running on this "
                                  f"host?)") from None
        except PermissionError:
            raise AgentNotRunning(f"cannot reach the agent on {path}: permission denied "
                                  f"(the admin socket is root only)") from None
        s.sendall(encode({"op": op, **args}))
        with s.makefile("rb") as rf:
            line = rf.readline()
    if not line:
        raise AgentNotRunning(f"the agent on {path} closed the connection without answering")
    return decode_response(line)
