#!/usr/bin/env bash
# Debian packages migrd needs on a host (and on the embedded test bed). Idempotent.
set -euo pipefail
say() { printf 'setup-system: %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { say "ERROR: must run as root"; exit 1; }

# Post-copy (lazy pages): CRIU asks the kernel for a 4 MiB pipe and, when refused (root here
# may lack CAP_SYS_RESOURCE), fails later with a misleading "tee: Operation not permitted".
# This is a system-wide setting; say so, and persist it for the next boot.
PIPE_MAX=4194304
current=$(cat /proc/sys/fs/pipe-max-size)
if [ "$current" -lt $PIPE_MAX ]; then
    say "raising fs.pipe-max-size $current -> $PIPE_MAX (system-wide; needed by post-copy migration)"
    sysctl -q -w fs.pipe-max-size=$PIPE_MAX
fi
if [ -d /etc/sysctl.d ] && [ ! -e /etc/sysctl.d/60-migrd.conf ]; then
    say "writing /etc/sysctl.d/60-migrd.conf (fs.pipe-max-size = $PIPE_MAX at boot)"
    printf '# migrd post-copy migration: CRIU needs 4 MiB pipes\nfs.pipe-max-size = %s\n' $PIPE_MAX \
        > /etc/sysctl.d/60-migrd.conf
fi

# iproute2/util-linux: namespaces for the bed; openssh: the transport's peer and scp baseline;
# iputils-arping: announce a moved service address; nftables: remove the network-lock table
# CRIU leaves on the source after a move; zstd: image compression.
# vagrant: `vagrant validate` of the multi-VM bed in the test suite.
# etcd-server: the optional load registry (daemon.registry: etcd); the tests and `bed up
# --registry etcd` start their own etcd process, so the package's system service stays off.
# runc, podman: container migration. Installed without recommends: runc recommends Debian 12's
# criu, which cannot dump on this kernel (install-criu.sh provides a working one); podman's
# default runtime crun cannot checkpoint, migrd runs its containers with runc.
pkgs=(iproute2 util-linux procps openssh-server openssh-client iputils-arping zstd nftables vagrant
      etcd-server python3 python3-venv ca-certificates make runc podman)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
install_missing() {
    export DEBIAN_FRONTEND=noninteractive
    # Keep apt from starting a system sshd on port 22 (or an etcd on 2379) as a side effect: migrd
    # runs its own sshd and etcd instances where it needs them.
    policy=/usr/sbin/policy-rc.d
    added_policy=0
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod 755 $policy; added_policy=1; fi
    trap '[ $added_policy = 1 ] && rm -f $policy' EXIT
    apt-get update -q >&2 || { say "ERROR: apt-get update failed"; exit 1; }
    apt-get install -y -q --no-install-recommends "${missing[@]}" >&2 \
        || { say "ERROR: apt-get install ${missing[*]} failed"; exit 1; }
    # The package also enables etcd.service for the next boot; an etcd installed here is only the
    # binary the tests and the bed run, so a system one is not left to start later.
    # (systemctl disable works without a running systemd: it only removes the links.)
    if [[ " ${missing[*]} " == *" etcd-server "* ]] && command -v systemctl >/dev/null; then
        systemctl disable etcd.service >/dev/null 2>&1 || true
    fi
}
if [ ${#missing[@]} -eq 0 ]; then say "all Debian packages present"; else
    say "installing: ${missing[*]}"; install_missing; fi

bash "$(dirname "$0")/build-image.sh"
say "done"
