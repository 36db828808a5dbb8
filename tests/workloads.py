"""Real workloads for the CRIU tests, and a registry that ends exactly the processes a test
started (by PID, after checking the PID still runs one of our scripts)."""

from __future__ import annotations

import os
import secrets
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil

from migrbed.programs import COUNTER, MARK
from migrbed.programs import read_counts as values

#: This test run's own token. copies() and end_copies() see every process on the machine, so a
#: marker must belong to this run: a path under its temporary directory (claimed by conftest)
#: or a name made by marker(). Two runs side by side then never count or kill each other's copies.
RUN_TOKEN = secrets.token_hex(4)
_run_dir: Path | None = None


def claim_run_dir(path: Path) -> None:
    """This run's temporary directory (pytest's basetemp): paths under it are markers too."""
    global _run_dir
    _run_dir = path


def marker(name: str) -> str:
    """A marker for a workload that carries no path of this run (put it in its command line)."""
    return f"migrd-test-{RUN_TOKEN}-{name}"


def of_this_run(mark: str) -> bool:
    return RUN_TOKEN in mark or (_run_dir is not None and mark.startswith(f"{_run_dir}/"))

# Answers each connection with how many it has answered so far: state a restore must keep.
SERVER = f"""
import socket, sys, time  # {MARK}
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", 0)); s.listen(8); s.settimeout(1)
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(str(s.getsockname()[1]))
import os; os.rename(sys.argv[1] + ".tmp", sys.argv[1])
served, deadline = 0, time.time() + 600
while time.time() < deadline:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    served += 1
    c.sendall(f"{{served}}\\n".encode()); c.close()
"""

# CLIENT ADDRESS COUNT TIMEOUT [GO]: asks the service on ADDRESS port 8080 COUNT times on one
# connection (each answer: how many it served so far), then (with GO) holds it until the file GO
# exists and asks 3 more times.
CLIENT = """
import socket, sys, os, time
c = socket.create_connection((sys.argv[1], 8080), timeout=float(sys.argv[3]))
out = []
def ask():
    c.sendall(b"x\\n"); out.append(int(c.recv(64)))
for _ in range(int(sys.argv[2])):
    ask()
if len(sys.argv) > 4:                     # hold the connection until the test says go on
    print(out, flush=True)
    deadline = time.time() + 120
    while not os.path.exists(sys.argv[4]) and time.time() < deadline:
        time.sleep(0.05)
    for _ in range(3):
        ask()
print(out, flush=True)
"""


def criu_tables(run_in, host: str) -> set[str]:
    """CRIU's network-lock tables in host's network namespace."""
    out = run_in(host, "nft", "list", "tables").stdout.decode().split("\n")
    return {line for line in out if "CRIU-" in line}


def wait_for(pred, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = pred()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def ask(port: int) -> int:
    import socket

    with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
        return int(c.recv(64).decode())


class Procs:
    """Starts workloads and remembers every PID to end, including restored ones."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.pids: set[int] = set()
        self.popens: list[subprocess.Popen] = []

    def start(self, script: str, *args: str) -> subprocess.Popen:
        """Start script as its own session leader (what CRIU dumps without --shell-job)."""
        log = open(self.tmp / "workload.out", "ab")
        p = subprocess.Popen([sys.executable, "-c", script, *args], stdin=subprocess.DEVNULL,
                             stdout=log, stderr=log, start_new_session=True)
        log.close()
        self.popens.append(p)
        self.adopt(p.pid)
        return p

    def start_job(self, script: str, *args: str) -> int:
        """Start script as a shell job: in a session and process group led by a shell that is
        not dumped (CRIU needs --shell-job). The shell leads its own session because a runner
        may have left us in session 0, whose processes CRIU cannot dump at all. Returns the
        job's PID; the shell reaps it once it ends."""
        log = self.tmp / "workload.out"
        sh = subprocess.Popen(["sh", "-c", '"$0" -c "$1" "$2" </dev/null >>"$3" 2>&1 & echo $!; wait',
                               sys.executable, script, *args, str(log)],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
        self.popens.append(sh)
        pid = int(sh.stdout.readline())
        sh.stdout.close()
        self.adopt(pid)
        return pid

    def adopt(self, pid: int) -> None:
        self.pids.add(pid)
        try:
            self.pids.update(c.pid for c in psutil.Process(pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass

    def reap(self, p: subprocess.Popen) -> None:
        """Collect the zombie CRIU leaves when it ends a dumped child of ours."""
        p.wait(timeout=10)

    def cleanup(self) -> None:
        for pid in list(self.pids):
            try:
                proc = psutil.Process(pid)
                if any(MARK in part for part in proc.cmdline()):
                    proc.kill()
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
        for p in self.popens:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Restored processes are not our children: give PID 1 no reason to keep their zombies.
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass


def container_counts(marker: str) -> list[int]:
    """/data/counter of the one live copy of a container, read through its root (bed hosts
    share one PID space); [] while there is not exactly one."""
    live = container_inits(marker)
    if len(live) != 1:
        return []
    try:
        return [int(x) for x in Path(f"/proc/{live[0]}/root/data/counter").read_text().split()]
    except (OSError, ValueError):
        return []


def copies(marker: str) -> list[int]:
    """Live processes anywhere on the machine running the workload named by marker (not the
    `unshare` that `migrctl run` leaves waiting for its PID namespace's init). Bed hosts share
    one PID space, so this counts copies on every host at once."""
    if not of_this_run(marker):
        raise ValueError(f"marker {marker!r} could match another test run's processes: "
                         f"use a path under this run's tmp_path or workloads.marker()")
    out = []
    for p in psutil.process_iter(["cmdline", "status", "name"]):
        try:
            if (p.info["status"] != psutil.STATUS_ZOMBIE and p.info["name"] != "unshare"
                    and any(marker in a for a in p.info["cmdline"] or ())):
                out.append(p.pid)
        except psutil.Error:
            pass
    return out


def container_inits(marker: str) -> list[int]:
    """The init of each live copy of a container running the workload named by marker: the
    copies whose parent is not one. A shell script forks a child for each command it runs, which
    carries the script's command line until it execs; that child is part of the same copy."""
    live = copies(marker)
    out = []
    for pid in live:
        try:
            if psutil.Process(pid).ppid() not in live:
                out.append(pid)
        except psutil.Error:
            pass
    return out


def end_copies(*markers: str) -> None:
    """Test cleanup: kill every live copy, on any host, of the workloads the markers name."""
    for marker in markers:
        for pid in copies(marker):
            try:
                psutil.Process(pid).kill()
            except psutil.Error:
                pass


def is_running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def not_private(top: Path) -> dict[str, str]:
    """Every directory below top (and top) not 0700 and every regular file not 0600, with its
    mode: what migrd must never leave, whatever the umask (see migrd/adapters/private.py)."""
    wrong = {}
    for p in [top, *top.rglob("*")]:
        st = p.lstat()
        want = 0o700 if stat.S_ISDIR(st.st_mode) else 0o600 if stat.S_ISREG(st.st_mode) else None
        if want is not None and stat.S_IMODE(st.st_mode) != want:
            wrong[str(p.relative_to(top))] = oct(stat.S_IMODE(st.st_mode))
    return wrong


__all__ = ["COUNTER", "SERVER", "Procs", "values", "wait_for", "ask", "is_running", "copies", "end_copies", "signal",
           "not_private"]
