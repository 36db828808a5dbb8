"""The transport between two bed hosts: run inside host1, sending to host2's sshd at
198.18.0.2, with the configs the bed wrote (strict host keys from them)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from migrd.engine import manifest
from test_transport import make_image

BED_HOSTS = 2

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def host1_config(bed) -> str:
    """host1's own config, as the bed wrote it (it starts migrctl on peers from this install)."""
    return "/etc/migrd/migrd.yaml"


def migrctl_in(run_in, host: str, cfg: str, *args: str, check: bool = True):
    return run_in(host, "env", f"MIGRD_CONFIG={cfg}", sys.executable, "-m", "migrd.cli", *args,
                  check=check, timeout=120)


@pytest.mark.parametrize("compression", ["none", "zstd"])
def test_send_host1_to_host2(bed, run_in, host1_config: str, tmp_path: Path, compression: str) -> None:
    src = tmp_path / "img"
    make_image(src)
    target = f"/srv/migrd/img-{compression}"  # host2's private directory
    out = migrctl_in(run_in, "host1", host1_config, "send", str(src), "host2", target,
                     "--compression", compression, "--json")
    figures = json.loads(out.stdout)
    assert figures["host"] == "host2" and figures["bytes"] == sum(p.stat().st_size for p in src.iterdir())
    arrived = bed.host("host2").dir / "srv" / f"img-{compression}"
    assert manifest.verify(arrived) == manifest.read(src)
    assert not (bed.host("host1").dir / "srv" / f"img-{compression}").exists()


def test_altered_image_refused_between_hosts(bed, run_in, host1_config: str, tmp_path: Path) -> None:
    src = tmp_path / "img"
    make_image(src)
    data = bytearray((src / "pages-1.img").read_bytes())
    data[0] ^= 1
    (src / "pages-1.img").write_bytes(data)
    out = migrctl_in(run_in, "host1", host1_config, "send", str(src), "host2", "/srv/migrd/bad", check=False)
    assert out.returncode == 6
    assert b"host2 (198.18.0.2:22): receiving into /srv/migrd/bad failed: image file pages-1.img was altered" in out.stderr
    srv = bed.host("host2").dir / "srv"
    assert not (srv / "bad").exists() and not (srv / "bad.partial").exists()


def test_hosts_command_inside_the_bed(bed, run_in, host1_config: str) -> None:
    rows = json.loads(migrctl_in(run_in, "host1", host1_config, "hosts", "--json").stdout)
    assert [r["name"] for r in rows] == ["host2"]  # not itself
    assert rows[0]["reachable"] and rows[0]["address"] == "198.18.0.2:22"
    assert rows[0]["rtt_ms"] > 0 and rows[0]["bandwidth_mb_s"] > 0
