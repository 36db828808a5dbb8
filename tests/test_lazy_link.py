"""Post-copy's framed channel (migrd/engine/lazy.py), both ends over pipes: no root, no CRIU."""

from __future__ import annotations

import os
import socket

import pytest

from migrd.engine import lazy, receive
from migrd.errors import MigrdError


class PipeTalk:
    """A stand-in for a transport.Conversation to `peer lazy`: sends go to the target's stdin,
    its stdout comes back."""

    class conn:
        where = "test"

    def __init__(self, to_target: int, from_target: int) -> None:
        self.to_target, self.from_target = to_target, from_target
        self.sent = 0

    def readline(self) -> bytes:
        return receive.read_line(self.from_target, 100)

    def send(self, data: bytes) -> None:
        self.sent += len(data)
        receive.write_all(self.to_target, data)

    def recv(self, n: int) -> bytes:
        return os.read(self.from_target, n)

    def close(self, timeout: float = 0) -> None:
        os.close(self.to_target)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_control_and_pages_cross_and_zstd_compresses_what_the_source_sends(compression):
    down_r, down_w = os.pipe()  # source -> target
    up_r, up_w = os.pipe()      # target -> source
    target = lazy.fd_link(down_r, up_w, compression)
    talk = PipeTalk(down_w, up_r)
    source = lazy.Source(talk, compression)
    target_criu, target_ours = socket.socketpair()
    target.attach(target_ours)
    source_criu = socket.socket(fileno=os.dup(source.criu_fd))
    source.criu_started()
    try:
        source.link.send_control({"restored": 1})
        assert target.control(5) == {"restored": 1}
        # What the source's CRIU serves reaches the target's CRIU, byte for byte; each relayed
        # piece is flushed, so a page fault's answer never waits for more.
        pages = b"".join(i.to_bytes(8, "big") + bytes(4088) for i in range(256))
        source_criu.sendall(pages)
        got = bytearray()
        target_criu.settimeout(5)
        while len(got) < len(pages):
            got += target_criu.recv(1 << 20)
        assert got == pages
        # And the requests the other way, plain.
        target_criu.sendall(b"want page 7")
        source_criu.settimeout(5)
        assert source_criu.recv(100) == b"want page 7"
        if compression == "zstd":
            assert talk.sent < len(pages) / 20
        else:
            assert talk.sent > len(pages)
    finally:
        for s in (source_criu, target_criu):
            s.close()
        source.close()
        os.close(up_w)
        assert target.closed.wait(5)


def test_an_unknown_compression_is_refused():
    with pytest.raises(MigrdError, match="unknown compression 'lz4'"):
        lazy.fd_link(0, 1, "lz4")


def test_a_stream_that_is_not_zstd_ends_the_link_and_says_why():
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    target = lazy.fd_link(down_r, up_w, "zstd")
    os.write(down_w, os.urandom(5000))
    os.close(down_w)
    try:
        assert target.closed.wait(5)
        assert target.error is not None and "not valid zstd" in target.error
        assert target.control(0) is None
    finally:
        for fd in (down_r, up_r, up_w):
            os.close(fd)
