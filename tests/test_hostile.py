"""Regression tests for issue 9's hostile-input findings 5-11: the exact inputs the issue lists,
each of which gave a traceback (or was silently accepted) before. No root needed."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import zstandard

from migrd.agent import admin
from migrd import config
from migrd.adapters import exchange
from migrd.engine import manifest, migration as migrate, receive
from migrd.config import Config
from migrd.errors import ConfigError, ImageError, InputError, JournalCorrupt
from migrd.engine.journal import Journal, summarize
from test_agent import make_agent  # noqa: F401  (fixture)
from test_policy import host
from test_transport import assert_nothing_left, make_image, reader, stream_of

# --------------------------------------------------------------------------- 5: peer snapshots


def good_snapshot() -> dict:
    return json.loads(exchange.Snapshot(host("b", 0.5), "normal", 42).to_json())


@pytest.mark.parametrize("data", [b"[1]", b"null", b'{"load": 5, "level": "normal", "agent_pid": 1}',
                                  b"\xff\xfe", b"[" * 100_000])
def test_malformed_snapshot_is_an_input_error_naming_the_peer(data: bytes) -> None:
    with pytest.raises(InputError, match="^b:/var/lib/migrd/load.json: "):
        exchange.Snapshot.from_json(data, "b:/var/lib/migrd/load.json")


def test_snapshot_of_a_newer_version_is_read_and_wrong_types_are_refused() -> None:
    d = good_snapshot()
    d["format"], d["new_top"], d["load"]["new_metric"] = 2, {"x": 1}, 3.5
    snap = exchange.Snapshot.from_json(json.dumps(d).encode())
    assert snap.load == host("b", 0.5) and snap.agent_pid == 42
    d["load"]["cpus"] = "four"
    with pytest.raises(InputError, match="key 'load.cpus': expected an integer"):
        exchange.Snapshot.from_json(json.dumps(d).encode())
    d = good_snapshot()
    d["load"]["cpu_capacity"] = 0  # the policy divides by it
    with pytest.raises(InputError, match="cpu_capacity"):
        exchange.Snapshot.from_json(json.dumps(d).encode())


# --------------------------------------------------------------------------- 6, 7: journals


def _journal(state: Path, name: str, lines: list[str] | None = None) -> Journal:
    j = Journal(state / "migrations" / name)
    j.record("precheck", request={"pid": 1, "start_time": 0.0, "target": "b", "mode": "move"})
    if lines is not None:
        with open(j.path, "a") as f:
            f.write("".join(ln + "\n" for ln in lines))
    return j


@pytest.mark.parametrize("bad", ["[1, 2]", '{"time": 1.0}', '{"state": "restore", "time": "x"}',
                                 '{"state": "restore", "time": 1.0, "data": [1]}', "not json"])
def test_corrupt_journal_is_reported_and_the_others_still_recovered(tmp_path: Path, bad: str) -> None:
    """Recovery used to stop with a traceback at the first corrupt journal."""
    corrupt = _journal(tmp_path, "20260101-000000000-aaaaaa", [bad])
    later = _journal(tmp_path, "20260101-000001000-bbbbbb")
    report = migrate.recover(Config(state_dir=tmp_path))
    assert [r["id"] for r in report] == [corrupt.id, later.id]
    assert report[0]["action"] == "skipped: corrupt journal" and f"{corrupt.path}:2" in report[0]["corrupt"]
    assert report[1]["action"] == "nothing had changed" and later.last_state() == "rolled_back"
    with pytest.raises(JournalCorrupt):
        corrupt.records()
    s = summarize(corrupt)
    assert s.outcome == "corrupt journal" and f"{corrupt.path}:2" in s.reason


def test_journal_data_of_the_wrong_type_is_corrupt_not_a_traceback(tmp_path: Path) -> None:
    """Well-formed records whose data recovery needs has the wrong shape."""
    j = _journal(tmp_path, "20260101-000000000-aaaaaa",
                 [json.dumps({"state": "transfer", "time": 2.0, "data": {"source": "a", "options": [1], "carry": 5}})])
    [r] = migrate.recover(Config(state_dir=tmp_path))
    assert r["action"] == "skipped: corrupt journal" and "key 'options'" in r["corrupt"], r
    assert j.last_state() == "transfer"  # left alone


def test_history_cli_shows_a_corrupt_journal(tmp_path: Path) -> None:
    _journal(tmp_path / "state", "20260101-000000000-aaaaaa", ["[1, 2]"])
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\ndaemon:\n  socket: {tmp_path / 'none.sock'}\n")
    r = subprocess.run([sys.executable, "-m", "migrd.cli", "history", "--json"], capture_output=True,
                       text=True, env={**os.environ, "MIGRD_CONFIG": str(cfg)}, timeout=60)
    assert r.returncode == 0, r.stderr
    [row] = json.loads(r.stdout)
    assert row["outcome"] == "corrupt journal" and "journal.jsonl:2" in row["reason"]


@pytest.mark.root
def test_recover_cli_warns_about_a_corrupt_journal_and_recovers_the_rest(tmp_path: Path) -> None:
    corrupt = _journal(tmp_path / "state", "20260101-000000000-aaaaaa", ["[1, 2]"])
    later = _journal(tmp_path / "state", "20260101-000001000-bbbbbb")
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\n")
    r = subprocess.run([sys.executable, "-m", "migrd.cli", "recover", "--json"], capture_output=True,
                       text=True, env={**os.environ, "MIGRD_CONFIG": str(cfg)}, timeout=60)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert f"{corrupt.path}:2" in r.stderr and f"migration {corrupt.id} left alone" in r.stderr
    report = {row["id"]: row for row in json.loads(r.stdout)}
    assert "corrupt" in report[corrupt.id] and report[later.id]["action"] == "nothing had changed"


def test_torn_tail_is_cut_before_the_next_append(tmp_path: Path) -> None:
    """A crash mid-append left a line without its newline; the next record used to be glued
    onto it, hiding it (and everything after) from recovery and history."""
    j = _journal(tmp_path, "20260101-000000000-aaaaaa")
    with open(j.path, "a") as f:
        f.write('{"data": {}, "state": "che')  # power lost here
    assert [r.state for r in j.records()] == ["precheck"]
    j.record("done", outcome="ok")
    assert [r.state for r in j.records()] == ["precheck", "done"]
    assert j.path.read_bytes().count(b"\n") == 2 and b'"che' not in j.path.read_bytes()
    assert migrate.recover(Config(state_dir=tmp_path)) == []  # done: nothing to recover


def test_torn_tail_without_any_newline_is_cut_to_empty(tmp_path: Path) -> None:
    j = Journal(tmp_path / "m")
    j.dir.mkdir()
    j.path.write_bytes(b"x" * 10_000)
    assert j.records() == []
    j.record("precheck")
    assert [r.state for r in j.records()] == ["precheck"]


# --------------------------------------------------------------------------- 8: config


@pytest.mark.parametrize("text, key, line", [
    ("host: !foo bar\n", "host", 1),
    ("state_dir: /x\nhost: !!python/name:os.system\n", "host", 2),
    ("state_dir: /x\n{a: 1}: x\n", "<top>", 2),
    ("daemon:\n  interval: " + "1" * 5001 + "\n", "daemon.interval", 2),
    ("ssh:\n  connect_timeout: -1\n", "ssh.connect_timeout", 2),
    ("ssh:\n  op_timeout: .nan\n", "ssh.op_timeout", 2),
    ("ssh:\n  op_timeout: 0\n", "ssh.op_timeout", 2),
    ("daemon:\n  interval: .inf\n", "daemon.interval", 2),
    ("hosts:\n  - name: a\n    address: 198.18.0.1\n    port: 99999999\n", "hosts[0].port", 4),
    ("hosts:\n  - name: a\n    address: 198.18.0.1\n    port: 0\n", "hosts[0].port", 4),
    ("state_dir: 5\n", "state_dir", 1),
    ("state_dir: ''\n", "state_dir", 1),
    ("state_dir: relative/dir\n", "state_dir", 1),
    ("policy:\n  cpu_second_cost:\n    [a]: 1\n", "policy.cpu_second_cost", 3),
    # found by test_fuzz.py: a malformed tagged value, a key holding a newline
    ("daemon:\n  max_decisions_log: !!timestamp 2000\n", "daemon.max_decisions_log", 2),
    ("? '\n\n  '\n: null\n", "\\n", 1),
])
def test_config_errors_name_key_and_line(text: str, key: str, line: int) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(text, "m.yaml")
    assert f"key '{key}' (line {line})" in str(e.value) and "\n" not in str(e.value)


def test_config_nested_too_deeply_and_not_utf8(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="^m.yaml:( line 1:)? not valid YAML: .*(depth|deeply)"):
        config.parse("[" * 100_000, "m.yaml")
    with pytest.raises(ConfigError, match='^m.yaml: not valid YAML: unacceptable character #x0000[^\n]*$'):
        config.parse('host: "\0"', "m.yaml")
    bad = tmp_path / "m.yaml"
    bad.write_bytes(b"host: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load(bad)


def test_daemon_exits_8_on_a_hostile_config(tmp_path: Path) -> None:
    bad = tmp_path / "migrd.yaml"
    bad.write_text("state_dir: /tmp/x\nhost: !!python/name:os.system\n")
    r = subprocess.run([sys.executable, "-m", "migrd.agent.daemon", "--once"], capture_output=True, text=True,
                       env={**os.environ, "MIGRD_CONFIG": str(bad)}, timeout=60)
    assert r.returncode == 8 and "key 'host' (line 2)" in r.stderr and "Traceback" not in r.stderr


# --------------------------------------------------------------------------- 9: manifests


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, '{"format": 1, "process": ' * 50_000])
def test_malformed_manifest_is_an_image_error(text: str) -> None:
    with pytest.raises(ImageError, match="^m.json"):
        manifest.from_json(text, "m.json")


def test_manifest_with_a_negative_size_is_refused(tmp_path: Path) -> None:
    m = make_image(tmp_path / "img", {"a.img": b"x"})
    d = json.loads(m.to_json())
    d["files"]["a.img"]["size"] = -1
    with pytest.raises(ImageError, match="negative size"):
        manifest.from_json(json.dumps(d), "m.json")


# --------------------------------------------------------------------------- 10: receiver


def test_receiver_bounds_the_padding_after_the_archive(tmp_path: Path) -> None:
    """2 GiB of zeros after the end marker (a few KB compressed) used to be read to the end."""
    make_image(tmp_path / "src")
    data, sha = stream_of(tmp_path / "src")
    # A tar writer's record padding is accepted ...
    assert receive.receive(reader(data + bytes(tarfile.RECORDSIZE)), tmp_path / "ok", sha)
    # ... 64 MiB of zeros after it are refused after reading little of them.
    consumed = 0
    zeros = bytes(1 << 20)

    def endless(n: int) -> bytes:
        nonlocal consumed
        if consumed < len(data):
            piece = data[consumed:consumed + n]
        else:
            piece = zeros[:min(n, len(data) + (64 << 20) - consumed)]
        consumed += len(piece)
        return piece

    target = tmp_path / "img"
    with pytest.raises(ImageError, match="padding after its end-of-archive"):
        receive.receive(endless, target, sha)
    assert consumed <= len(data) + (2 << 20)
    assert_nothing_left(target)


def test_receiver_bounds_compressed_padding(tmp_path: Path) -> None:
    make_image(tmp_path / "src")
    data, sha = stream_of(tmp_path / "src")
    bomb = zstandard.ZstdCompressor().compress(data + bytes(64 << 20))  # ~ 2 KB per MiB of zeros
    target = tmp_path / "img"
    with pytest.raises(ImageError, match="padding after its end-of-archive"):
        receive.receive(reader(bomb), target, sha, "zstd")
    assert_nothing_left(target)


# --------------------------------------------------------------------------- 11: admin socket


@pytest.mark.parametrize("req, message", [
    ({"op": "history", "limit": "abc"}, "key 'limit': expected an integer"),
    ({"op": "history", "limit": -1}, "at least 0"),
    ({"op": "explain", "pid": "7"}, "key 'pid': expected an integer"),
    ({"op": "offer"}, "'requester' is missing"),
    ({"op": "offer", "requester": ["b"]}, "key 'requester': expected a string"),
])
def test_admin_requests_of_the_wrong_shape_are_input_errors(make_agent, req, message) -> None:  # noqa: F811
    a = make_agent()
    with pytest.raises(InputError, match=message):
        a.handle(req)


def test_admin_socket_answers_every_malformed_request_and_stays_up(tmp_path: Path) -> None:
    """Deep nesting, a handler bug: each used to close the connection without an answer."""
    path = tmp_path / "s.sock"

    def handler(req):
        if req["op"] == "bug":
            raise ValueError("a bug in an operation")
        return req["op"]

    srv = admin.Server(path, handler)
    srv.start()
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(path))
            s.sendall(b"[" * 50_000 + b"\n" + b'{"op": "bug"}\n' + b'{"op": "ping"}\n')
            s.shutdown(socket.SHUT_WR)
            lines = s.makefile("rb").read().splitlines()
        answers = [json.loads(ln) for ln in lines]
        assert [a["ok"] for a in answers] == [False, False, True], answers
        assert "nested too deeply" in answers[0]["error"] and answers[0]["code"] == 3
        assert "internal error" in answers[1]["error"] and answers[2]["result"] == "ping"
    finally:
        srv.close()
