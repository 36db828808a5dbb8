"""The dump lock and the stale proc.crtools cleanup (migrd/adapters/dumplock.py), no root."""

from __future__ import annotations

import os
import stat
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from migrd.adapters import dumplock
from migrd.adapters.dumplock import Entry
from migrd.errors import DumpLockTimeout


@pytest.mark.parametrize("entry, stale", [
    (Entry(is_dir=True, entries=0, dev=5, cwd_dev=5), True),
    (Entry(is_dir=True, entries=1, dev=5, cwd_dev=5), False),   # something in it: not ours
    (Entry(is_dir=True, entries=0, dev=9, cwd_dev=5), False),   # a procfs mounted there now
    (Entry(is_dir=False, entries=-1, dev=5, cwd_dev=5), False),  # a file or a symlink
])
def test_only_an_empty_unmounted_directory_is_stale(entry, stale):
    assert dumplock.is_stale(entry) is stale


def test_a_long_wait_is_notable_a_short_one_is_not():
    assert not dumplock.notable_wait(0.2)
    assert dumplock.notable_wait(dumplock.NOTABLE_WAIT)


def test_busy_message_names_the_holder_when_known():
    msg = dumplock.busy_message(Path("/run/migrd/criu-dump.lock"), 5, "4242")
    assert "PID 4242" in msg and "5 s" in msg and "criu.dump_lock_timeout" in msg and "\n" not in msg
    assert "PID" not in dumplock.busy_message(Path("/x"), 5, "")


def test_lock_is_private_and_exclusive_and_its_wait_bounded(tmp_path):
    path = tmp_path / "run" / "criu-dump.lock"
    with dumplock.held(5, path) as first:
        assert first.waited < 1
        assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        t0 = time.monotonic()
        with pytest.raises(DumpLockTimeout) as e:
            dumplock.acquire(0.3, path)
        assert 0.3 <= time.monotonic() - t0 < 2
        assert f"PID {os.getpid()}" in str(e.value) and e.value.exit_code == 14
    with dumplock.held(0.3, path):  # released at the end of the block
        pass


def test_second_dump_waits_for_the_first_and_says_how_long(tmp_path, caplog):
    path = tmp_path / "criu-dump.lock"
    first = dumplock.acquire(5, path)
    threading.Timer(1.2, os.close, (first.fd,)).start()
    with caplog.at_level("WARNING", logger="migrd.adapters.dumplock"):
        with dumplock.held(10, path) as second:
            assert 1.1 <= second.waited < 5
    assert "waited" in caplog.text and "another CRIU dump" in caplog.text


def test_clear_stale_removes_only_an_empty_directory_in_the_tasks_cwd(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    (tmp_path / dumplock.CRTOOLS).mkdir()
    with caplog.at_level("WARNING", logger="migrd.adapters.dumplock"):
        # Threads share the cwd: seen once.
        assert dumplock.clear_stale([os.getpid(), os.getpid()]) == [str(tmp_path / dumplock.CRTOOLS)]
    assert not (tmp_path / dumplock.CRTOOLS).exists() and "stale" in caplog.text
    assert dumplock.clear_stale([os.getpid()]) == []


@pytest.mark.parametrize("kind", ["not empty", "file", "symlink"])
def test_clear_stale_leaves_anything_else_alone(tmp_path, monkeypatch, kind):
    monkeypatch.chdir(tmp_path)
    crtools = tmp_path / dumplock.CRTOOLS
    if kind == "not empty":
        crtools.mkdir()
        (crtools / "keep").write_text("x")
    elif kind == "file":
        crtools.write_text("x")
    else:
        (tmp_path / "empty").mkdir()
        crtools.symlink_to(tmp_path / "empty")
    assert dumplock.clear_stale([os.getpid()]) == []
    assert os.path.lexists(crtools)
    assert kind != "symlink" or (tmp_path / "empty").is_dir()


def test_clear_stale_skips_tasks_that_are_gone():
    assert dumplock.clear_stale([2**22 + 12345]) == []


def test_checkpoint_journals_only_a_notable_wait():
    from migrd.engine.checkpoint import Checkpoint

    def ck(wait: float) -> Checkpoint:
        return Checkpoint(manifest=SimpleNamespace(image_bytes=10), images=Path("/x"),  # type: ignore[arg-type]
                          dump_seconds=0.1, log=Path("/l"), lock_wait=wait)

    assert ck(0.01).figures(100.0) == {"freeze": 100.01, "dump_seconds": 0.1, "image_bytes": 10}
    assert ck(2.34567).figures(100.0, streamed_bytes=5) == {
        "freeze": 102.34567, "dump_seconds": 0.1, "dump_lock_wait": 2.346, "image_bytes": 15}
