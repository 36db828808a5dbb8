"""SSH failure modes that must stay one readable line and never kill the agent: an unusable
client key (missing, garbage, passphrase-protected), a file name that is not UTF-8 in a remote
argv, and a peer that only speaks old algorithms (CBC, hmac-sha1). Unit tests without root;
the rest against real sshds on 127.0.0.1 (root)."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import paramiko
import pytest

from migrd.agent import loop as agent_mod
from migrd import config
from migrd.adapters import exchange, transport
from migrbed import sshd
from migrd.config import Config, DaemonSettings, HostEntry, SshSettings
from migrd.errors import ConfigError, InputError, TransportError
from migrbed.programs import COUNTER
from test_transport import free_port, peer, wait_listening  # noqa: F401 (peer is a fixture)
from workloads import copies, end_copies, wait_for

PY = sys.executable
#: Substrings that mark an algorithm as too old to offer.
WEAK = ("cbc", "3des", "arcfour", "blowfish", "sha1", "md5", "group1-", "ssh-rsa", "ssh-dss")


# --------------------------------------------------------------------------- the client key


@pytest.fixture(params=["missing", "garbage", "passphrase"])
def bad_key(request, tmp_path: Path) -> tuple[Path, str]:
    """(path, what the error must say) for each way a client key can be unusable."""
    path = tmp_path / "keys" / request.param
    path.parent.mkdir()
    if request.param == "garbage":
        path.write_bytes(os.urandom(300))
        return path, "is not a private key migrd can use"
    if request.param == "passphrase":
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "a passphrase", "-f", str(path)],
                       check=True, timeout=60)
        return path, "is protected by a passphrase"
    return path, "no such file or directory"


def key_config(tmp_path: Path, key: Path, port: int | None = None) -> Path:
    """A config file whose ssh.client_key is key, with one peer on 127.0.0.1."""
    cfg = Config(host="self", state_dir=tmp_path / "state",
                 hosts=(HostEntry("peer", "127.0.0.1", port or free_port()),),
                 ssh=SshSettings(client_key=key, connect_timeout=2.0),
                 daemon=DaemonSettings(socket=tmp_path / "run" / "migrd.sock"))
    path = tmp_path / "migrd.yaml"
    path.write_text(config.dump(cfg))
    return path


def test_unusable_client_key_is_a_config_error(bad_key, tmp_path: Path) -> None:
    key, what = bad_key
    cfg = config.load(key_config(tmp_path, key))
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(tmp_path))}/migrd.yaml: key 'ssh.client_key': .*{re.escape(str(key))}.*{what}"):
        transport.connect(cfg, "peer")


def test_hosts_probe_with_an_unusable_key_exits_8_with_one_line(bad_key, tmp_path: Path) -> None:
    key, what = bad_key
    r = subprocess.run([PY, "-m", "migrd.cli", "hosts", "--probe"], capture_output=True, text=True,
                       env={**os.environ, "MIGRD_CONFIG": str(key_config(tmp_path, key))}, timeout=60)
    assert r.returncode == ConfigError.exit_code, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("migrctl: error: ") and what in r.stderr, r.stderr
    assert str(key) in r.stderr


def test_peer_reader_records_an_unusable_key_and_never_raises(bad_key, tmp_path: Path) -> None:
    key, what = bad_key
    reader = exchange.PeerReader(config.load(key_config(tmp_path, key)), "peer")
    reader.poll(100.0)
    assert what in reader.view.error and reader.view.failures == 1 and reader.view.retry_at > 100.0


def test_peer_reader_survives_an_unexpected_error(tmp_path: Path, monkeypatch) -> None:
    def broken(*_a, **_k):
        raise AttributeError("a bug")

    monkeypatch.setattr(exchange.transport, "connect", broken)
    reader = exchange.PeerReader(config.load(key_config(tmp_path, tmp_path / "k")), "peer")
    reader.poll(100.0)
    assert reader.view.error == "unexpected AttributeError: a bug" and reader.view.failures == 1


def test_agent_loop_survives_a_round_that_raises_anything(tmp_path: Path, monkeypatch) -> None:
    a = agent_mod.Agent(config.load(key_config(tmp_path, tmp_path / "k")), env={})
    rounds = []

    def round_():
        rounds.append(1)
        if len(rounds) == 1:
            raise AttributeError("a bug")
        a.stop.set()

    monkeypatch.setattr(a, "round", round_)
    monkeypatch.setattr(a, "_sleep_until", lambda deadline: None)
    a.run()
    assert len(rounds) == 2


# --------------------------------------------------------------------------- argv bytes


def test_command_line_keeps_file_name_bytes_and_refuses_what_argv_cannot_carry() -> None:
    name = os.fsdecode(b"/tmp/caf\xe9 \xff")  # Latin-1, not UTF-8
    assert transport.command_line(["ls", "--", name]) == b"ls -- '/tmp/caf\xe9 \xff'"
    assert transport.command_line([b"/a\xff", Path("/b")]) == b"'/a\xff' /b"
    with pytest.raises(InputError, match="contains a NUL byte"):
        transport.command_line(["rm", "/tmp/a\0/etc"])
    with pytest.raises(InputError, match="cannot pass '\\\\ud800'"):
        transport.command_line(["\ud800"])


# --------------------------------------------------------------------------- algorithms


def test_offered_algorithms_are_modern_only() -> None:
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as sock:  # never used: nothing is sent
        t = transport._transport_factory(transport.DEFAULT_TUNING, sock)
        opts = t.get_security_options()
        offered = {"ciphers": opts.ciphers, "macs": opts.digests, "kex": opts.kex, "keys": opts.key_types,
                   "pubkeys": t.preferred_pubkeys}
    for kind, names in offered.items():
        assert names and not [n for n in names if any(w in n for w in WEAK)], (kind, names)
    assert set(opts.ciphers) <= set(transport.CIPHERS) and set(opts.digests) <= set(transport.MACS)
    assert opts.ciphers[0] == "aes128-gcm@openssh.com"  # the measured fastest stays first
    # A benchmark's preference reorders, but cannot bring back what is not allowed.
    assert transport.offered(("aes128-cbc", "aes128-ctr"), transport.CIPHERS, paramiko.Transport._preferred_ciphers) \
        == ("aes128-ctr", "aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes192-ctr", "aes256-ctr")


@pytest.mark.root
@pytest.mark.parametrize("algorithms, which, ours", [
    ("Ciphers aes128-cbc\nMACs hmac-sha1\n", "no acceptable ciphers", "aes128-gcm@openssh.com"),
    ("Ciphers aes128-ctr\nMACs hmac-sha1,hmac-md5\n", "no acceptable macs", "hmac-sha2-256-etm@openssh.com"),
])
def test_a_peer_offering_only_old_algorithms_is_refused(tmp_path: Path, algorithms: str, which: str,
                                                         ours: str) -> None:
    key = sshd.ensure_keypair(tmp_path / "client" / "id_ed25519")
    port = free_port()
    files = sshd.prepare(tmp_path / "sshd", "127.0.0.1", port, [key.with_suffix(".pub").read_text()])
    files.config.write_text(files.config.read_text() + algorithms)
    server = sshd.start(files, log_file=tmp_path / "sshd.log")
    try:
        wait_listening(port)
        cfg = Config(host="self", state_dir=tmp_path / "state", ssh=SshSettings(client_key=key, connect_timeout=10.0),
                     hosts=(HostEntry("old", "127.0.0.1", port, host_keys=(
                         sshd.known_hosts_line("127.0.0.1", port, files.host_public_key()),)),))
        refused = rf"old \(127\.0\.0\.1:{port}\): SSH algorithm negotiation failed \({which}\): migrd offers only "
        with pytest.raises(TransportError, match=rf"^{refused}.*{re.escape(ours)}"):
            transport.connect(cfg, "old")
        (tmp_path / "migrd.yaml").write_text(config.dump(cfg))
        r = subprocess.run([PY, "-m", "migrd.cli", "hosts", "--probe", "--json"], capture_output=True, text=True,
                           env={**os.environ, "MIGRD_CONFIG": str(tmp_path / "migrd.yaml")}, timeout=60)
        assert r.returncode == 0 and r.stderr == "", r.stderr
        assert re.match(refused, json.loads(r.stdout)[0]["error"])
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.root
def test_non_utf8_names_reach_the_peer_as_the_same_bytes(peer, tmp_path: Path) -> None:  # noqa: F811
    cfg, _ = peer
    name = os.fsdecode(bytes(tmp_path) + b"/caf\xe9-\xff")
    with transport.connect(cfg, "peer") as conn:
        r = conn.run([PY, "-c", "import os, sys; print(os.fsencode(sys.argv[1]).hex())", name])
        assert r.status == 0, r.stderr
        assert bytes.fromhex(r.stdout.decode()) == os.fsencode(name)
        src = tmp_path / "src"
        src.write_bytes(b"data")
        assert conn.put_file(src, name + "/file") == 4
    with open(os.fsencode(name) + b"/file", "rb") as f:
        assert f.read() == b"data"


# --------------------------------------------------------------------------- migrctl migrate


@pytest.mark.root
def test_migrate_with_an_unusable_key_exits_8_and_changes_nothing(bad_key, tmp_path: Path) -> None:
    key, what = bad_key
    env = {**os.environ, "MIGRD_CONFIG": str(key_config(tmp_path, key))}
    out = tmp_path / "counter"
    started = subprocess.run([PY, "-m", "migrd.cli", "run", "--json", "--", PY, "-c", COUNTER, str(out)],
                             capture_output=True, text=True, env=env, timeout=60, check=True)
    pid = json.loads(started.stdout)["pid"]
    try:
        wait_for(lambda: out.exists(), what="the counter to start")
        r = subprocess.run([PY, "-m", "migrd.cli", "migrate", str(pid), "--to", "peer"], capture_output=True,
                           text=True, env=env, timeout=120)
        assert r.returncode == ConfigError.exit_code, r.stderr
        assert r.stderr.count("\n") == 1 and what in r.stderr and str(key) in r.stderr, r.stderr
        assert copies(str(out)) == [pid]
        states = [json.loads(ln)["state"] for j in (tmp_path / "state" / "migrations").iterdir()
                  for ln in (j / "journal.jsonl").read_text().splitlines()]
        assert states == ["precheck", "refused"]
    finally:
        end_copies(str(out))
