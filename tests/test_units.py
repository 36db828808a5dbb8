"""Pure logic: manifest, CRIU log parsing, config parsing, PID parsing. No root needed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from migrd import model
from migrd import config
from migrd.adapters import criu, mounts, procfs
from migrd.engine import manifest as mf
from migrd.errors import ConfigError, ImageError, InputError

LOG = """\
(00.000000) Version: 4.2.1 (gitid 0)
(00.001000) Error (criu/rlimit.c:12): rlimit: Can't setup RLIMIT_NOFILE for self: Operation not permitted
(00.002000) Warn  (criu/kerndat.c:1290): Can't keep kdat cache on non-tempfs
(00.120000) Error (criu/sk-unix.c:874): unix: External socket is used. Consider using --ext-unix-sk option.
(00.130000) Error (criu/cr-dump.c:2099): Dumping FAILED.
"""


def test_error_lines_skip_harmless_noise_and_keep_order():
    assert criu.error_lines(LOG) == [
        "unix: External socket is used. Consider using --ext-unix-sk option. [criu/sk-unix.c:874]",
        "Dumping FAILED. [criu/cr-dump.c:2099]",
    ]


def test_error_lines_of_a_clean_log_is_empty():
    assert criu.error_lines("(00.1) Info: ok\n(00.2) Warn (x.c:1): meh\n") == []


def test_version_parsing():
    assert criu.parse_version("Version: 4.2.1\nGitID: v4.2\n") == "4.2.1"
    assert criu.version_tuple("4.2.1") > criu.version_tuple("4.1.10") >= (4, 1)


def test_version_is_asked_once_per_binary(tmp_path: Path):
    asked = tmp_path / "asked"
    fake = tmp_path / "criu"
    fake.write_text(f"#!/bin/sh\necho . >> {asked}\necho 'Version: 4.2.1'\n")
    fake.chmod(0o700)
    assert criu.Criu(fake).version() == criu.Criu(fake).version() == "4.2.1"
    assert asked.read_text() == ".\n"
    fake.write_text(f"#!/bin/sh\necho . >> {asked}\necho 'Version: 4.3'\n")  # upgraded in place
    assert criu.Criu(fake).version() == "4.3"


def test_a_feature_is_asked_once_per_binary_and_feature(tmp_path: Path):
    asked = tmp_path / "asked"
    fake = tmp_path / "criu"
    fake.write_text(f'#!/bin/sh\necho "$3" >> {asked}\n[ "$3" = mem_dirty_track ]\n')
    fake.chmod(0o700)
    c = criu.Criu(fake)
    assert c.has_feature("mem_dirty_track") and criu.Criu(fake).has_feature("mem_dirty_track")
    assert not c.has_feature("uffd-noncoop") and not c.has_feature("uffd-noncoop")
    assert asked.read_text().split() == ["mem_dirty_track", "uffd-noncoop"]


def sample_manifest(files: dict[str, mf.FileEntry]) -> mf.Manifest:
    info = model.ProcessInfo(pid=42, cmdline=("sleep", "1"), exe="/bin/sleep", cwd="/", uid=0,
                          rss=1, start_time=1.0,
                          open_files=(model.OpenFile("/srv/x", 3, "r", 10),),
                          listening=(model.Listener("inet", "127.0.0.1", 80),), tree_ids=(42, 43))
    return mf.Manifest(mf.FORMAT, 2.0, "4.2.1", "h1", info, {"shell_job": False}, files)


def test_manifest_round_trip(tmp_path: Path):
    (tmp_path / "pages-1.img").write_bytes(b"\0" * 4096)
    (tmp_path / "core-42.img").write_bytes(b"core")
    m = sample_manifest(mf.scan(tmp_path))
    mf.write(tmp_path, m)
    assert mf.verify(tmp_path) == m
    assert m.image_bytes == 4100
    assert set(m.files) == {"pages-1.img", "core-42.img"}


@pytest.mark.parametrize("hashes", [True, False])
def test_streamed_page_images_are_checked_by_name_and_size(tmp_path: Path, hashes: bool):
    """A page server wrote pages-*.img on the target: the source's manifest cannot list them."""
    (tmp_path / "core-42.img").write_bytes(b"core")
    mf.write(tmp_path, sample_manifest(mf.scan(tmp_path)))
    (tmp_path / "pages-1.img").write_bytes(b"\0" * 4096)
    (tmp_path / "pagemap-42.img").write_bytes(b"map")
    streamed = {"pages-1.img": 4096, "pagemap-42.img": 3}
    assert set(mf.verify(tmp_path, hashes=hashes, streamed=streamed).files) == {"core-42.img"}
    with pytest.raises(ImageError, match="pages-1.img has size 4096, manifest says 8192"):
        mf.verify(tmp_path, hashes=hashes, streamed={**streamed, "pages-1.img": 8192})
    with pytest.raises(ImageError, match="pagemap-42.img is not in the manifest"):
        mf.verify(tmp_path, hashes=hashes, streamed={"pages-1.img": 4096})
    with pytest.raises(ImageError, match="also in the manifest"):
        mf.verify(tmp_path, hashes=hashes, streamed={**streamed, "core-42.img": 4})
    with pytest.raises(ImageError, match="illegal file name"):
        mf.verify(tmp_path, hashes=hashes, streamed={**streamed, "../x": 1})


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda d: (d / "core-42.img").unlink(), "core-42.img is missing"),
        (lambda d: (d / "stray.img").write_bytes(b""), "stray.img is not in the manifest"),
        (lambda d: (d / "core-42.img").write_bytes(b"corE"), "core-42.img was altered"),
        (lambda d: (d / "core-42.img").write_bytes(b"core!"), "core-42.img has size 5"),
        (lambda d: (d / "sub").mkdir(), "sub is not a regular file"),
    ],
)
def test_manifest_verification_names_the_bad_file(tmp_path: Path, mutate, message):
    (tmp_path / "core-42.img").write_bytes(b"core")
    mf.write(tmp_path, sample_manifest(mf.scan(tmp_path)))
    mutate(tmp_path)
    with pytest.raises(ImageError, match=message):
        mf.verify(tmp_path)


@pytest.mark.parametrize("bad", ["../etc/passwd", "a/b", "", "..", "manifest.json"])
def test_manifest_refuses_illegal_names(bad):
    files = {bad: mf.FileEntry(1, "0" * 64)}
    with pytest.raises(ImageError, match="illegal file name"):
        mf.compare(files, files, "x")


def test_manifest_from_bad_json():
    with pytest.raises(ImageError, match="not a valid migrd manifest"):
        mf.from_json('{"format": 1}')
    with pytest.raises(ImageError, match="unsupported manifest format"):
        mf.from_json('{"format": 99}')


def test_parse_pid():
    assert procfs.parse_pid(" 17 ") == 17
    for bad in ["x", "1.5", "-3", "0", ""]:
        with pytest.raises(InputError):
            procfs.parse_pid(bad)


def test_ns_chain():
    assert procfs.ns_chain("Name:\tsh\nNSpid:\t5231\t1\n") == [5231, 1]
    assert procfs.ns_chain("Name:\tsh\nNSsid:\t0\n", "NSsid") == [0]
    assert procfs.ns_chain("Name:\tsh\n") == []


def test_session_outside_pid_namespace():
    assert procfs.session_outside("NSsid:\t0\n")  # PID 1's session, as CI starts us
    assert procfs.session_outside("NSsid:\t812\t0\n")  # leader in the parent namespace
    assert not procfs.session_outside("NSsid:\t812\t1\n")
    assert not procfs.session_outside("Name:\tsh\n")  # kernels without NSsid: let CRIU judge


def test_config_defaults_and_round_trip():
    c = config.parse("host: h1\nhosts:\n  - {name: h1, address: 198.18.0.1}\n")
    assert c.peer("h1").port == 22
    again = config.parse(config.dump(c))
    assert dataclasses.replace(again, source=None) == c
    with pytest.raises(InputError, match="unknown host 'h9'.*h1"):
        c.peer("h9")


@pytest.mark.parametrize(
    "text, message",
    [
        ("ssh:\n  conect_timeout: 3\n", r"key 'ssh.conect_timeout' \(line 2\): unknown key"),
        ("hosts:\n  - address: 1.2.3.4\n", r"'hosts\[0\]' \(line 2\): missing required key 'name'"),
        ("ssh:\n  connect_timeout: soon\n", r"'ssh.connect_timeout' \(line 2\): expected a number"),
        ("hosts: 3\n", r"'hosts' \(line 1\): expected a list"),
        ("host: [\n", r"line \d+: not valid YAML"),
        ("migrate:\n  strategies: [lazy]\n",
         r"'migrate.strategies\[0\]' \(line 2\): expected one of stream-copy, stop-copy, postcopy, precopy, hybrid, auto, got 'lazy'"),
        ("ssh:\n  compression: gzip\n", r"'ssh.compression' \(line 2\): expected one of none, zstd"),
    ],
)
def test_config_errors_name_key_and_line(text, message):
    with pytest.raises(ConfigError, match=message):
        config.parse(text, "migrd.yaml")


def test_missing_explicit_config_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MIGRD_CONFIG", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        config.load()


MOUNTINFO = """\
22 1 254:1 / / rw,relatime - ext4 /dev/vda rw
23 22 0:5 / /run rw,nosuid - ext4 /dev/vda rw
40 23 0:44 / /run rw,nosuid - tmpfs tmpfs rw,size=16384k
41 40 254:1 /run/migrd /run/migrd rw - ext4 /dev/vda rw
42 22 0:30 /sub /srv/with\\040space rw - xfs /dev/vdb rw,noquota
"""


def test_mount_holding_a_path_is_the_deepest_and_last_mounted():
    table = mounts.parse(MOUNTINFO)
    assert mounts.holding(table, Path("/run")).fstype == "tmpfs"  # mounted over the ext4 one
    assert mounts.holding(table, Path("/run/criu.kdat")).fstype == "tmpfs"
    assert mounts.holding(table, Path("/run/migrd/bed")).mountpoint == Path("/run/migrd")
    assert mounts.holding(table, Path("/runner")).mountpoint == Path("/")
    spaced = mounts.holding(table, Path("/srv/with space/x"))
    assert (spaced.fstype, spaced.root, spaced.options) == ("xfs", "/sub", frozenset({"rw", "noquota"}))
    assert mounts.parse("garbage\n1 2 3 - \n") == []


def test_criu_keeps_its_probe_cache_only_on_a_tmpfs():
    assert criu.probe_cache_unready_reason("tmpfs") is None
    assert "/run is ext4, not a tmpfs" in criu.probe_cache_unready_reason("ext4")
    assert "not mounted" in criu.probe_cache_unready_reason(None)
