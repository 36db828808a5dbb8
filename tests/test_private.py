"""migrd/adapters/private.py: directories 0700 and files 0600 whatever the umask, the repair of an old
state directory, atomic writes, and the refusal of directories another user could change.
No root needed."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from migrd import model
from migrd.adapters import private
from migrd.errors import NotPermitted
from workloads import not_private


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture
def umask_022():
    """The umask of a root shell or an sshd session: what made 0755/0644 state before."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_private_dir_creates_every_missing_level_0700(tmp_path, umask_022):
    tmp_path.chmod(0o755)
    top = tmp_path / "a"
    private.private_dir(top / "b" / "c")
    assert [mode(p) for p in (top, top / "b", top / "b" / "c")] == [0o700] * 3
    assert mode(tmp_path) == 0o755  # an existing parent (/var/lib) is not migrd's to change


def test_private_dir_repairs_an_existing_0755_dir(tmp_path, umask_022):
    d = tmp_path / "old"
    d.mkdir(mode=0o755)
    assert mode(d) == 0o755
    private.private_dir(d)
    assert mode(d) == 0o700


def test_write_atomic_is_0600_and_leaves_no_tmp(tmp_path, umask_022):
    target = tmp_path / "f.json"
    target.write_text("old")
    target.chmod(0o644)
    for durable in (True, False):
        private.write_atomic(target, f"new {durable}", durable=durable)
        assert target.read_text() == f"new {durable}"
        assert mode(target) == 0o600
        assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_open_private_narrows_an_existing_wide_file(tmp_path, umask_022):
    f = tmp_path / "journal.jsonl"
    f.write_text("x\n")
    f.chmod(0o644)
    os.close(private.open_private(f, os.O_WRONLY | os.O_APPEND))
    assert mode(f) == 0o600


def test_restrict_files_makes_criu_style_images_0600(tmp_path, umask_022):
    for name in ("pages-1.img", "core-1.img"):
        (tmp_path / name).write_bytes(b"secret")
    assert mode(tmp_path / "pages-1.img") == 0o644
    private.restrict_files(tmp_path)
    assert {mode(p) for p in tmp_path.iterdir()} == {0o600}


def old_state_dir(root: Path) -> Path:
    """A state directory as migrd left it before private.py under umask 022."""
    state = root / "state"
    for d in ("logs", "migrations/20260101-000000000-abcdef/images", "incoming/x/images", "workloads/logs"):
        (state / d).mkdir(parents=True)
    for f in ("logs/dump-1.log", "migrations/20260101-000000000-abcdef/journal.jsonl",
              "migrations/20260101-000000000-abcdef/images/pages-1.img", "workloads/w.json",
              "workloads/logs/w.out", "decisions.jsonl", "load.json"):
        (state / f).write_text("x")
    return state


def walk_modes(top: Path) -> dict[str, int]:
    out = {".": mode(top)}
    for dirpath, dirnames, filenames in os.walk(top):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            out[str(p.relative_to(top))] = mode(p)
    return out


def test_secure_state_dir_repairs_a_0755_state_dir_and_everything_in_it(tmp_path, umask_022):
    state = old_state_dir(tmp_path)
    outside = tmp_path / "outside"
    outside.write_text("not migrd's")
    (state / "link").symlink_to(outside)
    before = walk_modes(state)
    assert before["."] == 0o755 and before["decisions.jsonl"] == 0o644
    private.secure_state_dir(state)
    after = walk_modes(state)
    wrong = {k: oct(v) for k, v in after.items()
             if k != "link" and v != (0o700 if (state / k).is_dir() else 0o600)}
    assert not wrong, wrong
    assert mode(outside) == 0o644  # a symbolic link is not followed


def test_secure_state_dir_leaves_a_missing_state_dir_to_be_created_later(tmp_path):
    private.secure_state_dir(tmp_path / "none")
    assert not (tmp_path / "none").exists()


def test_check_trusted_dir_refuses_group_or_world_writable(tmp_path):
    d = tmp_path / "img"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(NotPermitted, match=r"img is mode 0777 lets group or others write it") as e:
        private.check_trusted_dir(d, "image directory")
    assert e.value.exit_code == 4
    d.chmod(0o755)
    private.check_trusted_dir(d, "image directory")  # root's (ours) and only ours to write


def test_check_trusted_dir_refuses_a_symlink(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(NotPermitted, match="symbolic link"):
        private.check_trusted_dir(tmp_path / "link", "image directory")


def test_check_trusted_dir_refuses_a_dir_inside_a_world_writable_parent(tmp_path):
    """Who can write the parent can rename the directory away and put their own there."""
    parent = tmp_path / "shared"
    parent.mkdir()
    parent.chmod(0o777)
    (parent / "img").mkdir(mode=0o700)
    with pytest.raises(NotPermitted, match=r"inside .*shared \(uid \d+, mode 0777\)"):
        private.check_trusted_dir(parent / "img", "image directory")
    parent.chmod(0o1777)  # sticky like /tmp: others cannot rename our entries
    private.check_trusted_dir(parent / "img", "image directory")


# --- what migrd writes with them, under umask 022 ------------------------------------------


def test_journal_registry_decisions_and_snapshot_are_private(tmp_path, umask_022):
    from migrd.adapters import exchange, workloads
    from migrd.engine import journal
    from migrd.agent.loop import DecisionLog

    state = tmp_path / "state"
    j = journal.Journal(state / "migrations" / journal.new_id())
    fd = j.lock()  # the orchestrator locks before it records anything
    os.close(fd)
    j.record("precheck", request={"pid": 1, "env": {"SECRET": "x"}})
    workloads.Registry(state).add(workloads.Workload("w", 1, 1.0, ("sleep", "1"), "/", "/dev/null"))
    log = DecisionLog(state / "decisions.jsonl", limit=2)
    for i in range(4):  # past the limit: the trimmed rewrite too
        log.append({"i": i})

    class Snap:
        def to_json(self) -> bytes:
            return b"{}"

    exchange.publish(state, Snap())  # type: ignore[arg-type]
    assert not_private(state) == {}
    assert len(list(state.rglob("*"))) == 7  # nothing else was left behind (no .tmp)


def test_received_images_are_private(tmp_path, umask_022):
    from migrd.engine import manifest as mf
    from migrd.engine import receive

    src = tmp_path / "src"
    src.mkdir()
    (src / "pages-1.img").write_bytes(b"secret" * 1000)
    info = model.ProcessInfo(pid=42, cmdline=("sleep", "1"), exe="/bin/sleep", cwd="/", uid=0, rss=0,
                          start_time=0.0)
    mf.write(src, mf.Manifest(mf.FORMAT, 1.0, "test", "h", info, {}, mf.scan(src)))
    # manifest.write made manifest.json 0600; the source's own dir and image stay as they were
    assert not_private(src) == {".": "0o755", "pages-1.img": "0o644"}
    raw, m = receive.manifest_bytes(src)
    data = b"".join(receive.image_stream(src, raw, sorted(m.files)))
    incoming = tmp_path / "incoming"
    pieces = iter([data, b""])
    receive.receive(lambda n: next(pieces), incoming / "mid" / "images", hashlib.sha256(raw).hexdigest())
    assert not_private(incoming) == {}
    assert sorted(p.name for p in (incoming / "mid" / "images").iterdir()) == ["manifest.json", "pages-1.img"]


def test_migrctl_repairs_an_old_state_dir_before_using_it(tmp_path, umask_022):
    """The one entry point (config loading) repairs what an older migrd left 0755/0644."""
    state = old_state_dir(tmp_path)
    cfg = tmp_path / "migrd.yaml"
    cfg.write_text(f"state_dir: {state}\ndaemon:\n  socket: {tmp_path / 'none.sock'}\n")
    r = subprocess.run([sys.executable, "-m", "migrd.cli", "history", "--json"], capture_output=True,
                       text=True, timeout=60, env={**os.environ, "MIGRD_CONFIG": str(cfg)})
    assert r.returncode == 0, r.stderr
    assert not_private(state) == {}
