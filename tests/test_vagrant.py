"""What can be checked of the Vagrant multi-VM bed without booting it (that is
test_vagrant_boot.py, `make test-vagrant`): Vagrant accepts the file, and the config it gives
each VM is a valid migrd config naming every peer with a host key."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from migrd import config

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(shutil.which("vagrant") is None, reason="vagrant is installed by make setup")


def test_vagrant_validate():
    r = subprocess.run(["vagrant", "validate", "--ignore-provider"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "validated successfully" in r.stdout


def test_each_vm_gets_a_valid_cluster_config():
    # Evaluate the Vagrantfile's own helper with a stand-in for Vagrant.configure.
    script = ('module Vagrant; def self.configure(*); end; end\n'
              'load "Vagrantfile"\n'
              'print migrd_yaml("host2")\n')
    env = {**os.environ, "MIGRD_VMS": "3"}   # the VM count is a variable at the top of the file
    r = subprocess.run(["ruby", "-e", script], cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    cfg = config.parse(r.stdout, "vagrant host2")
    assert cfg.host == "host2"
    assert [h.name for h in cfg.hosts] == ["host1", "host2", "host3"]
    assert [h.address for h in cfg.hosts] == ["198.18.1.11", "198.18.1.12", "198.18.1.13"]
    assert all(h.host_keys and h.host_keys[0].startswith(h.address + " ssh-ed25519 ") for h in cfg.hosts)
