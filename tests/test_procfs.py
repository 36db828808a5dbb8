"""migrd.adapters.procfs: the /proc readers the target side uses instead of psutil, checked
against psutil on live processes. No root needed."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil

from migrd.adapters import procfs

TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0
   1: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0
   2: garbage
"""


def test_listening_sockets_are_read_from_proc_net_tcp():
    assert procfs.parse_listening(TCP) == {4242: 8080}


def test_readers_agree_with_psutil_on_live_processes():
    me = psutil.Process()
    assert abs(procfs.start_time(os.getpid()) - me.create_time()) < 0.05
    assert procfs.cmdline(os.getpid()) == me.cmdline()
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen()
        port = srv.getsockname()[1]
        assert port in procfs.listening_ports(os.getpid()) and port in procfs.listening_ports()
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        try:
            assert child.pid in procfs.children(os.getpid()) and child.pid in procfs.descendants(os.getpid())
            assert port not in procfs.listening_ports(child.pid)  # its own sockets only
            deadline = time.monotonic() + 10
            while procfs.state(child.pid) != "S" and time.monotonic() < deadline:
                time.sleep(0.01)  # until it sleeps
            theirs = psutil.Process(child.pid)
            assert procfs.holder(child.pid) == f"{theirs.name()} ({theirs.status()}, parent {os.getpid()})"
        finally:
            child.kill()
            child.wait()
    assert procfs.start_time(child.pid) is None and procfs.holder(child.pid) is None
    assert procfs.cmdline(child.pid) == [] and procfs.children(child.pid) == []
    assert 0 < procfs.mem_available() <= psutil.virtual_memory().total
