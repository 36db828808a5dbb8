"""Pure rules of container moves: what changed in a rootfs, what a target's facts refuse."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from migrd.adapters import rootfs
from migrd.core import precheck
from migrd.core.rootfs import XATTR_SIZE_MAX, Change, Entry, changes, refusal, refused, safe_path
from migrd.errors import ImageError
from migrd.engine.subjects import RuncContainer
from migrd.model import ContainerInfo, ProcessInfo

BASE = {
    "bin": Entry("dir", 0o755),
    "bin/sh": Entry("link", 0o777, target="/bin/busybox"),
    "etc": Entry("dir", 0o755),
    "etc/motd": Entry("file", 0o644, 5, "aa"),
    "etc/old": Entry("dir", 0o755),
    "etc/old/x": Entry("file", 0o644, 1, "bb"),
}


def test_added_modified_and_deleted_are_all_found_parents_first():
    now = {k: v for k, v in BASE.items() if not k.startswith("etc/old")}
    now["etc/motd"] = Entry("file", 0o644, 9, "cc")            # modified content
    now["bin/sh"] = Entry("link", 0o777, target="/bin/dash")     # modified link
    now["data"] = Entry("dir", 0o700)
    now["data/new"] = Entry("file", 0o600, 3, "dd")
    got = changes(BASE, now)
    assert [(c.path, c.change) for c in got] == [
        ("etc/old", "deleted"),  # only the top of a deleted subtree
        ("bin/sh", "modified"), ("data", "added"), ("data/new", "added"), ("etc/motd", "modified")]


def test_unchanged_tree_and_mode_change():
    assert changes(BASE, dict(BASE)) == ()
    now = dict(BASE, **{"etc/motd": Entry("file", 0o600, 5, "aa")})
    assert changes(BASE, now) == (Change("etc/motd", "modified", "file", 0o600, 5, "aa"),)


def test_paths_from_another_host_must_stay_inside():
    assert safe_path("etc/motd")
    assert not any(safe_path(p) for p in ("", "/etc/motd", "../x", "etc/../../x", "etc//x", "./x"))


def test_owner_xattrs_and_special_files_are_changes_too():
    now = dict(BASE)
    now["etc"] = Entry("dir", 0o755, uid=1000, gid=100)                            # owner only
    now["etc/motd"] = Entry("file", 0o644, 5, "aa", xattrs=(("user.tag", "6869"),))  # xattr only
    now["etc/fifo"] = Entry("fifo", 0o600, uid=7)
    now["etc/null"] = Entry("char", 0o666, rdev=os.makedev(1, 3))
    got = {c.path: c for c in changes(BASE, now)}
    assert set(got) == {"etc", "etc/motd", "etc/fifo", "etc/null"}
    assert got["etc"].change == "modified" and (got["etc"].uid, got["etc"].gid) == (1000, 100)
    assert got["etc/motd"].xattrs == (("user.tag", "6869"),)
    assert got["etc/fifo"].entry == now["etc/fifo"] and got["etc/null"].entry == now["etc/null"]


GOOD = Change("data/x", "added", "file", 0o640, 3, "a" * 64, blob="rootfs-000001", uid=1234, gid=1234,
              xattrs=(("user.a", "00ff"), ("user.b", "")))


def test_a_sound_change_from_another_host_is_accepted():
    assert refusal(GOOD) is None and refused((GOOD, GOOD)) is None
    assert refused((GOOD, dataclasses.replace(GOOD, uid=-1))).startswith("refusing the container's rootfs changes: ")
    assert refusal(Change("../../etc/passwd", "deleted", "file")) is not None
    assert refusal(Change("dev/sda", "added", "block", 0o600, rdev=os.makedev(8, 0))) is None


@pytest.mark.parametrize("bad,says", [
    (dict(path="../../root/.ssh/authorized_keys"), "not a plain relative path"),
    (dict(path="/etc/shadow"), "not a plain relative path"),
    (dict(uid=-1), "not a valid uid:gid"),
    (dict(gid=2**32 - 1), "not a valid uid:gid"),
    (dict(uid=2**70), "not a valid uid:gid"),
    (dict(mode=0o170000), "not a permission mode"),
    (dict(sha256="zz"), "no valid size and sha256"),
    (dict(size=-1), "no valid size and sha256"),
    (dict(blob="../../x"), "not in a rootfs-N image file"),
    (dict(blob="manifest.json"), "not in a rootfs-N image file"),
    (dict(xattrs=(("security.capability", "00"),)), "is not a user.* name"),
    (dict(xattrs=(("trusted.x", "00"),)), "is not a user.* name"),
    (dict(xattrs=(("user." + "n" * 300, "00"),)), "is not a user.* name"),
    (dict(xattrs=(("user.big", "00" * (XATTR_SIZE_MAX + 1)),)), "at most 65536 bytes"),
    (dict(xattrs=(("user.odd", "abc"),)), "at most 65536 bytes"),
    (dict(xattrs=tuple((f"user.{i:04d}", "") for i in range(1000))), "extended attributes (at most"),
    (dict(xattrs=(("user.a", ""), ("user.a", "00"))), "repeated or out of order"),
    (dict(kind="link", target="", xattrs=()), "not a valid symlink target"),
    (dict(kind="char", rdev=-5, xattrs=()), "device number"),
    (dict(kind="fifo"), "extended attributes on a fifo"),
])
def test_hostile_changes_are_refused_in_one_line(bad, says):
    why = refusal(dataclasses.replace(GOOD, **bad))
    assert why is not None and says in why and "\n" not in why and len(why) < 400, why


def _tree(root: Path) -> None:
    (root / "etc").mkdir(parents=True)
    (root / "etc/motd").write_text("hello\n")
    (root / "data").mkdir()
    (root / "data/counter").write_text("0\n")
    os.symlink("/bin/busybox", root / "sh")


def test_owner_mode_xattrs_fifo_and_links_travel_and_are_checked(tmp_path):
    """Scan, export, apply into a fresh copy of the image, check: no root needed (the owner is
    the test's own; user.* attributes on the test's own files)."""
    image, src, dst, images = (tmp_path / n for n in ("image", "src", "dst", "images"))
    _tree(image)
    rootfs.copy_image(image, src)
    (src / "data/counter").write_text("0\n1\n2\n")
    os.chmod(src / "data/counter", 0o640)
    os.setxattr(src / "data/counter", "user.migrd", b"\x00kept\xff")
    os.setxattr(src / "etc", "user.dir", b"d")
    os.mkfifo(src / "data/ask", 0o620)
    os.chown(src / "data/ask", os.getuid(), os.getgid())
    os.symlink("counter", src / "data/latest")
    (src / "etc/motd").unlink()
    base = rootfs.scan(image)
    chs = changes(base, rootfs.scan(src))
    assert {c.path: c.change for c in chs} == {"etc/motd": "deleted", "etc": "modified", "data/counter": "modified",
                                               "data/ask": "added", "data/latest": "added"}
    images.mkdir()
    exported = rootfs.export(src, chs, images)
    rootfs.copy_image(image, dst)
    rootfs.apply(dst, exported, images)
    assert rootfs.check(dst, exported) == []
    assert rootfs.scan(dst) == rootfs.scan(src)
    assert os.getxattr(dst / "data/counter", "user.migrd") == b"\x00kept\xff"
    # Applying again changes nothing: a path already right (a FIFO a restored process holds
    # open) keeps its inode.
    inode = (dst / "data/ask").stat().st_ino
    rootfs.apply(dst, exported, images)
    assert (dst / "data/ask").stat().st_ino == inode
    # What the check sees when the target's copy is not what the manifest says.
    os.removexattr(dst / "data/counter", "user.migrd")
    os.chmod(dst / "etc", 0o700)
    assert rootfs.check(dst, exported) == ["data/counter: extended attributes", "etc: mode 0o700 (want 0o755)"]


def test_an_image_copy_scans_as_the_image(tmp_path):
    image = tmp_path / "image"
    _tree(image)
    os.mkfifo(image / "data/fifo", 0o640)
    os.setxattr(image / "etc/motd", "user.from", b"image")
    rootfs.copy_image(image, tmp_path / "copy")
    assert rootfs.scan(tmp_path / "copy") == rootfs.scan(image)


def test_apply_refuses_everything_before_writing_anything(tmp_path):
    dst, images = tmp_path / "dst", tmp_path / "images"
    _tree(dst)
    images.mkdir()
    (images / "rootfs-000000").write_text("x")
    evil = (Change("data/new", "added", "dir", 0o755),
            Change("data/y", "added", "file", 0o644, 1, "a" * 64, blob="rootfs-000000", uid=2**40))
    with pytest.raises(ImageError, match="not a valid uid:gid") as e:
        rootfs.apply(dst, evil, images)
    assert "\n" not in str(e.value) and not (dst / "data/new").exists()


def test_apply_never_writes_through_a_link_out_of_the_rootfs(tmp_path):
    dst, outside, images = tmp_path / "dst", tmp_path / "outside", tmp_path / "images"
    _tree(dst)
    outside.mkdir()
    images.mkdir()
    os.symlink(str(outside), dst / "escape")
    with pytest.raises(ImageError, match="leads out of the rootfs"):
        rootfs.apply(dst, (Change("escape/fifo", "added", "fifo", 0o644, uid=os.getuid(), gid=os.getgid()),),
                     images)
    assert list(outside.iterdir()) == []


INFO = ProcessInfo(pid=10, cmdline=("sh",), exe="/bin/busybox", cwd="/", uid=0, rss=1 << 20,
                   start_time=1.0, own_pid_namespace=True, tree_ids=(10, 11))
CT = ContainerInfo("web", "runc", "busybox", "d1", "/b/web", {}, True)
FACTS = precheck.TargetFacts(criu_ok=True, criu_message="", cpu_ok=True, cpu_message="",
                             mem_available=1 << 30, disk_free=1 << 30)


def container_request(ask: precheck.Ask) -> precheck.Request:
    return precheck.Request(id="m", mode="move", rss=1 << 20, ports=(), carry=(), with_files=False,
                            move_address=None, headroom=1.2, ask=ask)


def test_container_asks_for_its_runtime_image_and_name_not_host_pids_and_files():
    assert RuncContainer(INFO, CT).precheck_ask() == precheck.ContainerAsk("web", "runc", "busybox", "d1")


def test_container_precheck_refusals():
    req = container_request(RuncContainer(INFO, CT).precheck_ask())
    ok = precheck.ContainerFacts(runtime_ok=True, image_digest="d1")
    assert precheck.evaluate(req, dataclasses.replace(FACTS, subject=ok)) == []
    bad = precheck.ContainerFacts(runtime_ok=False, runtime_message="no runc", image_digest="other",
                                  name_taken=True, loopback_up=False)
    problems = precheck.evaluate(req, dataclasses.replace(FACTS, subject=bad))
    assert len(problems) == 4 and "differs" in problems[1] and "exists on the target" in problems[2]
    missing = precheck.evaluate(req, dataclasses.replace(FACTS, subject=precheck.ContainerFacts(runtime_ok=True)))
    assert missing == ["image busybox is not on the target (run `make setup` there)"]
    assert precheck.evaluate(req, FACTS) == ["the target did not check container web"]
    # Facts of the other kind of subject are no check of this one.
    assert precheck.evaluate(req, dataclasses.replace(FACTS, subject=precheck.ProcessFacts())) == [
        "the target did not check container web"]


def test_container_moves_by_stop_copy_only():
    from migrd.config import Config, MigrateSettings
    from migrd.engine import strategies
    from migrd.engine.migration import Options

    def prefer(*names: str) -> Config:
        return Config(migrate=MigrateSettings(strategies=names))

    subject = RuncContainer(INFO, CT)
    s, skipped = strategies.choose(INFO, Options(target="h2"), prefer("stream-copy", "postcopy", "stop-copy"),
                                   refuses=lambda n: subject.refuses(n, "move"))
    assert s is not None and s.name == "stop-copy" and len(skipped) == 2
    s, skipped = strategies.choose(INFO, Options(target="h2", mode="clone"), prefer("stop-copy"),
                                   refuses=lambda n: subject.refuses(n, "clone"))
    assert s is None and "--mode clone" in skipped[0]


def test_podman_needs_the_very_image_id_there():
    from migrd.engine.subjects import PodmanContainer

    ct = dataclasses.replace(CT, runtime="podman", image_id="abc")
    ask = PodmanContainer(INFO, ct).precheck_ask()
    assert ask == precheck.ContainerAsk("web", "podman", "busybox", "d1", "abc")
    req = container_request(ask)
    same = precheck.ContainerFacts(runtime_ok=True, image_digest="d1", image_id="abc")
    assert precheck.evaluate(req, dataclasses.replace(FACTS, subject=same)) == []
    other = dataclasses.replace(same, image_id="def")
    assert precheck.evaluate(req, dataclasses.replace(FACTS, subject=other)) == [
        "podman's image busybox on the target has another ID than the source's"]
