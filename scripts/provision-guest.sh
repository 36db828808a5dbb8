#!/usr/bin/env bash
# Provisioning of one VM of the Vagrant bed (run by Vagrant as root, this checkout at /vagrant).
# Env: MIGRD_HOST (this VM's name), MIGRD_YAML (its /etc/migrd/migrd.yaml, see the Vagrantfile).
#
# The libvirt box (make box) already holds every package and a CRIU, because its VMs have no
# route out; on a box that lacks them (VirtualBox's debian/bookworm64, which has NAT) they are
# installed from the network the same way as on any Debian host.
set -euo pipefail
say() { printf 'provision %s: %s\n' "$MIGRD_HOST" "$*" >&2; }
src=/vagrant
keys=$src/.vagrant-cluster

# Identity and trust: this VM's host key, the cluster's client key, root login with it.
install -d -m 0700 /etc/migrd /root/.ssh
install -m 0600 "$keys/${MIGRD_HOST}_host_key" /etc/ssh/ssh_host_ed25519_key
install -m 0644 "$keys/${MIGRD_HOST}_host_key.pub" /etc/ssh/ssh_host_ed25519_key.pub
install -m 0600 "$keys/client_key" /etc/migrd/id_ed25519
install -m 0600 "$keys/client_key.pub" /root/.ssh/authorized_keys
printf '%s' "$MIGRD_YAML" > /etc/migrd/migrd.yaml
chmod 0600 /etc/migrd/migrd.yaml
systemctl restart ssh

# Debian packages (present in the libvirt box: nothing is fetched there).
pkgs=(python3 python3-pip python3-setuptools python3-paramiko python3-psutil python3-yaml python3-click
      python3-zstandard python3-etcd3gw python3-prometheus-client iproute2 nftables iputils-arping zstd procps)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    say "installing ${missing[*]}"
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# What `make setup` does to a host besides packages: the pipe size post-copy needs, and a CRIU
# proven on this kernel (check + dump/restore of a process holding a TCP socket).
sysctl -q -w fs.pipe-max-size=4194304
bash "$src/scripts/install-criu.sh"

# migrd itself, from this checkout; its dependencies are the Debian packages above.
build=$(mktemp -d /tmp/migrd-src.XXXXXX)
cp -a "$src/." "$build/"
rm -rf "$build/.vagrant-cluster"
PIP_NO_INDEX=1 python3 -m pip install -q --no-deps --no-build-isolation --break-system-packages \
    --root-user-action=ignore "$build"
rm -rf "$build"
migrctl check

# The real unit (Type=notify, watchdog), as `make install` writes it, started now and at boot.
install -m 0644 "$src/systemd/migrd.service" /etc/systemd/system/migrd.service
systemctl daemon-reload
systemctl enable migrd
# restart, not start: a provisioning run again (`vagrant provision`) installed a new release, and
# an agent still running the old one would answer the new migrctl.
systemctl restart migrd
systemctl is-active migrd
say "migrd $(migrctl --version | awk '{print $NF}') active"
