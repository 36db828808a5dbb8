"""Pre-copy with CRIU's pre-dumps, the parts that need no soft-dirty kernel: which way the
rounds track dirty pages, the manifest's view of CRIU's `parent` link, and the chain the
target links itself. The moves themselves run on the Vagrant VMs, whose kernels have
soft-dirty (tests/test_vagrant_boot.py, `make test-vagrant`)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from migrd import config, model
from migrd.core.precopy import TRACKING, dirty_tracking
from migrd.engine import manifest as mf
from migrd.engine import predump
from migrd.errors import ConfigError, ImageError


@pytest.mark.parametrize("setting, soft_dirty, way", [
    ("auto", True, "criu"), ("auto", False, "content"), ("criu", True, "criu"),
    ("content", True, "content"), ("content", False, "content")])
def test_the_rounds_use_criu_pre_dumps_where_the_kernel_tracks_soft_dirty_pages(setting, soft_dirty, way):
    assert dirty_tracking(setting, soft_dirty) == (way, None)
    assert way in TRACKING


def test_criu_tracking_asked_on_a_kernel_without_soft_dirty_says_what_to_do():
    way, why = dirty_tracking("criu", False)
    assert way is None
    assert "no soft-dirty tracking" in why and "auto or content" in why


def test_the_setting_is_checked_and_the_chain_bounded():
    assert config.parse("migrate:\n  dirty_tracking: content\n").migrate.dirty_tracking == "content"
    with pytest.raises(ConfigError, match="dirty_tracking"):
        config.parse("migrate:\n  dirty_tracking: soft\n")
    with pytest.raises(ConfigError, match="at most 64 rounds"):
        config.parse("migrate:\n  precopy_rounds: 65\n")


def image_dir(path: Path, parents: int, pages: bytes = b"p" * 8192) -> mf.Manifest:
    path.mkdir(parents=True)
    (path / "pages-1.img").write_bytes(pages)
    (path / "pagemap-1.img").write_bytes(b"m" * 100)
    info = model.ProcessInfo(pid=42, cmdline=("sleep", "1"), exe="/bin/sleep", cwd="/", uid=0, rss=1,
                             start_time=1.0)
    m = mf.Manifest(mf.FORMAT, 1.0, "4.2", "h", info, {}, mf.scan(path), parents=parents)
    mf.write(path, m)
    return m


def test_criu_parent_link_is_not_an_image_file_but_any_other_link_is_refused(tmp_path):
    images = tmp_path / "images"
    image_dir(images, parents=1)
    os.symlink(f"../{predump.CHAIN}/1", images / mf.PARENT_LINK)
    assert sorted(mf.scan(images)) == ["pagemap-1.img", "pages-1.img"]
    assert mf.verify(images, hashes=False).parents == 1
    os.symlink("/etc/passwd", images / "core-1.img")
    with pytest.raises(ImageError, match="not a regular file"):
        mf.scan(images)


@pytest.mark.parametrize("parents", [-1, mf.MAX_PARENTS + 1])
def test_a_manifest_naming_an_impossible_chain_is_refused(tmp_path, parents):
    m = image_dir(tmp_path / "images", parents=0)
    text = dataclasses.replace(m, parents=parents).to_json()
    with pytest.raises(ImageError, match="pre-dumps is not between 0 and 64"):
        mf.from_json(text)


def test_the_target_links_the_chain_as_the_source_dumped_it(tmp_path):
    d = tmp_path / "incoming" / "mid"
    chain = d / predump.CHAIN
    for number in (1, 2, 3):
        image_dir(predump.round_dir(chain, number), parents=number - 1)
    images = d / "images"
    image_dir(images, parents=3)
    predump.link_chain(images, 3)
    predump.link_chain(images, 3)  # asked again: the same links
    assert os.readlink(images / "parent") == "../predump/3"
    assert os.readlink(chain / "3" / "parent") == "../2"
    assert os.readlink(chain / "2" / "parent") == "../1"
    assert not os.path.lexists(chain / "1" / "parent")
    # CRIU follows images/parent/parent/... down to the first pre-dump.
    assert (images / "parent" / "parent" / "parent" / "pages-1.img").read_bytes() == b"p" * 8192
    assert predump.page_bytes(images) == 8192


def test_a_missing_or_foreign_pre_dump_stops_the_restore(tmp_path):
    d = tmp_path / "mid"
    images = d / "images"
    image_dir(images, parents=2)
    image_dir(predump.round_dir(d / predump.CHAIN, 1), parents=0)
    with pytest.raises(ImageError, match="predump/2 is not a directory"):
        predump.link_chain(images, 2)  # round 2 never arrived
    image_dir(predump.round_dir(d / predump.CHAIN, 2), parents=0)
    with pytest.raises(ImageError, match="leans on 0 pre-dumps, expected 1"):
        predump.link_chain(images, 2)


def test_a_link_the_target_did_not_make_is_refused(tmp_path):
    d = tmp_path / "mid"
    images = d / "images"
    image_dir(images, parents=1)
    image_dir(predump.round_dir(d / predump.CHAIN, 1), parents=0)
    os.symlink("/", images / "parent")
    with pytest.raises(ImageError, match="is not the link to ../predump/1"):
        predump.link_chain(images, 1)


def test_rounds_and_the_final_dump_name_their_parents_relative_to_themselves():
    assert predump.round_parent(1) is None
    assert predump.round_parent(3) == predump.Parent("../2", 2)
    assert predump.final_parent(4) == predump.Parent("../predump/4", 4)
    assert predump.remote_round_dir("/var/lib/migrd/incoming/m1/images", 2) == "/var/lib/migrd/incoming/m1/predump/2"
