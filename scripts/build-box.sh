#!/usr/bin/env bash
# The Vagrant box of the multi-VM bed, built here from Debian packages only (no box is ever
# downloaded): Debian trixie made with debootstrap, everything the guests need so that
# provisioning needs no network (the VMs have no route out): python3 and migrd's dependencies
# as Debian packages, openssh, iproute2, systemd, and the CRIU this host proved (the private
# prefix /opt/migrd/criu of install-criu.sh, Debian sid's CRIU with its own libraries).
#
# Cached: the box is rebuilt only when its recipe changes (this script, or the CRIU it ships).
# Result: box "migrd/trixie" added to $VAGRANT_HOME for the libvirt provider.
set -euo pipefail
say() { printf 'build-box: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
trap 'say "ERROR: line $LINENO: $BASH_COMMAND failed"' ERR
[ "$(id -u)" = 0 ] || die "must run as root (debootstrap)"

# QEMU runs as libvirt-qemu and reads the box's kernel from the box directory: nothing on
# the way may be private (a box under /root fails with "could not open kernel file").
BASE=${MIGRD_VAGRANT_DIR:-/var/lib/migrd-vagrant}
export VAGRANT_HOME=${VAGRANT_HOME:-$BASE/home}
BOX_NAME=${MIGRD_BOX:-migrd/trixie}
SUITE=trixie
CRIU_PREFIX=/opt/migrd/criu
# The system (debootstrap's minbase plus these): what a Vagrant guest needs to boot, be reached
# and be configured. dhcpcd-base + ifupdown: the management network's lease and the private
# network Vagrant configures.
BASE_PACKAGES=(linux-image-amd64 systemd-sysv udev openssh-server iproute2 ifupdown dhcpcd-base sudo)
# Installed afterwards with apt, which resolves virtual dependencies that debootstrap does not
# (python3-zstandard needs python3-cffi-backend-api-min, provided by python3-cffi-backend).
# python3-*: migrd's dependencies (pyproject.toml) from Debian, since the guests cannot reach
# PyPI; python3-pip + setuptools install migrd itself from the copy provisioning brings in.
# rsync: Vagrant's synced folder. nftables: CRIU's network-lock table is removed after a move.
PACKAGES=(rsync procps nftables iputils-arping zstd python3 python3-pip python3-setuptools
          python3-paramiko python3-psutil python3-yaml python3-click python3-zstandard
          python3-etcd3gw python3-prometheus-client)

[ -x "$CRIU_PREFIX/bin/criu" ] || die "no CRIU at $CRIU_PREFIX: run 'make criu' first (the box ships the one it proved)"
recipe=$( { cat "$0"; printf '%s\n' "${BASE_PACKAGES[@]}" "${PACKAGES[@]}"; "$CRIU_PREFIX/bin/criu" --version; } | sha256sum | cut -c1-16)

install -d -m 0755 "$BASE" "$VAGRANT_HOME"
out=$BASE/box
if [ -f "$out/recipe" ] && [ "$(cat "$out/recipe")" = "$recipe" ] \
    && vagrant box list 2>/dev/null | grep "^$BOX_NAME " >/dev/null; then
    say "box $BOX_NAME is current (recipe $recipe)"; exit 0
fi

uri=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -1)
uri=${uri:-http://deb.debian.org/debian}
keyring=/usr/share/keyrings/debian-archive-keyring.gpg

work=$(mktemp -d "$BASE/build.XXXXXX")
root=$work/rootfs
# Downloaded packages are kept for the next build (a recipe change rarely changes them all).
debs=$BASE/debs
install -d -m 0755 "$debs" "$debs/partial"
cleanup() {
    umount "$root/var/cache/apt/archives" 2>/dev/null || true
    umount "$root/proc" 2>/dev/null || true
    # Never delete through a mount that is still there (the package cache, /proc).
    if mountpoint -q "$root/proc" || mountpoint -q "$root/var/cache/apt/archives"; then
        say "left $work in place: a mount below it could not be removed"
    else rm -rf "$work"; fi
}
trap cleanup EXIT
t0=$SECONDS
say "debootstrap $SUITE from $uri (minbase + ${#BASE_PACKAGES[@]} packages)"
debootstrap --variant=minbase --keyring="$keyring" --cache-dir="$debs" \
    --include="$(IFS=,; echo "${BASE_PACKAGES[*]}")" "$SUITE" "$root" "$uri" > "$work/debootstrap.log" 2>&1 \
    || { tail -n 20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
say "debootstrap took $((SECONDS - t0)) s"
mount -t proc proc "$root/proc"
mount --bind "$debs" "$root/var/cache/apt/archives"
# Nothing may start inside the chroot (sshd would listen on the host's port 22).
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod 755 "$root/usr/sbin/policy-rc.d"
chroot "$root" apt-get update -q > "$work/apt.log" 2>&1 \
    && chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        "${PACKAGES[@]}" >> "$work/apt.log" 2>&1 \
    || { tail -n 20 "$work/apt.log" >&2; die "apt-get install in the box failed (log above)"; }
rm -f "$root/usr/sbin/policy-rc.d"
umount "$root/var/cache/apt/archives" "$root/proc"
say "packages installed at $((SECONDS - t0)) s"

# --- the system -----------------------------------------------------------------------------
echo migrd-box > "$root/etc/hostname"
printf '/dev/vda / ext4 rw,relatime 0 1\n' > "$root/etc/fstab"
cat > "$root/etc/network/interfaces" <<'EOF'
auto lo
iface lo inet loopback

# the management network (vagrant-libvirt's DHCP on 198.18.x)
auto eth0
iface eth0 inet dhcp
EOF
# Every VM must get its own identity: systemd writes a machine-id at first boot, and sshd's
# host keys are made at first boot (provisioning replaces the ed25519 one with the cluster's).
: > "$root/etc/machine-id"
rm -f "$root"/etc/ssh/ssh_host_*
cat > "$root/etc/systemd/system/ssh-hostkeys.service" <<'EOF'
[Unit]
Description=Generate this VM's SSH host keys
Before=ssh.service
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
EOF
install -d "$root/etc/systemd/system/multi-user.target.wants"
ln -sf /etc/systemd/system/ssh-hostkeys.service "$root/etc/systemd/system/multi-user.target.wants/ssh-hostkeys.service"
printf 'UseDNS no\n' > "$root/etc/ssh/sshd_config.d/vagrant.conf"

# Vagrant's convention: user vagrant, passwordless sudo, its insecure key (Vagrant replaces it
# with a generated one at the first `vagrant up`).
vagrant_pub=$(find /usr/share/rubygems-integration /usr/lib/ruby /opt/vagrant -path '*/keys/vagrant.pub' 2>/dev/null | head -1 || true)
[ -n "$vagrant_pub" ] || die "Vagrant's keys/vagrant.pub not found (is the vagrant package installed?)"
chroot "$root" useradd -m -s /bin/bash vagrant
install -d -m 0700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 0600 -o 1000 -g 1000 "$vagrant_pub" "$root/home/vagrant/.ssh/authorized_keys"
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' > "$root/etc/sudoers.d/vagrant"
chmod 0440 "$root/etc/sudoers.d/vagrant"

# What `make setup` does to a host, minus the network: post-copy needs 4 MiB pipes, and the
# CRIU this host proved (provisioning proves it again inside each guest).
printf '# migrd post-copy migration: CRIU needs 4 MiB pipes\nfs.pipe-max-size = 4194304\n' \
    > "$root/etc/sysctl.d/60-migrd.conf"
install -d -m 0755 "$root/opt/migrd"
cp -a "$CRIU_PREFIX" "$root/opt/migrd/"

# --- the box: kernel and initrd beside a raw ext4 root (no partitions, no bootloader) ------------
kernel=$(cd "$root/boot" && ls vmlinuz-* | sort -V | tail -1)
initrd=$(cd "$root/boot" && ls initrd.img-* | sort -V | tail -1)
[ -n "$kernel" ] && [ -n "$initrd" ] || die "no kernel/initrd in $root/boot"
box=$work/box
mkdir "$box"
cp "$root/boot/$kernel" "$box/vmlinuz"; cp "$root/boot/$initrd" "$box/initrd.img"
t1=$SECONDS
truncate -s 4G "$work/root.raw"
mkfs.ext4 -q -L root -d "$root" "$work/root.raw" || die "mkfs.ext4 -d failed"
qemu-img convert -O qcow2 "$work/root.raw" "$box/box.img"
rm -f "$work/root.raw"
printf '{"provider":"libvirt","format":"qcow2","virtual_size":4}\n' > "$box/metadata.json"
cat > "$box/Vagrantfile" <<'EOF'
# The box's own defaults: boot its kernel directly (the image has no bootloader).
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |libvirt|
    libvirt.kernel = File.join(__dir__, "vmlinuz")
    libvirt.initrd = File.join(__dir__, "initrd.img")
    libvirt.cmd_line = "root=/dev/vda rw console=ttyS0 net.ifnames=0"
  end
end
EOF
(cd "$box" && tar -cf "$work/migrd-trixie.box" metadata.json Vagrantfile box.img vmlinuz initrd.img)
say "image and box packed in $((SECONDS - t1)) s ($(du -h "$work/migrd-trixie.box" | cut -f1))"
vagrant box add --force --name "$BOX_NAME" --provider libvirt "$work/migrd-trixie.box" >&2 \
    || die "vagrant box add failed"
# The box's files (kernel, initrd) are read by QEMU as libvirt-qemu.
chmod -R a+rX "$VAGRANT_HOME/boxes"
install -d -m 0755 "$out"
echo "$recipe" > "$out/recipe"
say "box $BOX_NAME built in $((SECONDS - t0)) s (recipe $recipe, VAGRANT_HOME=$VAGRANT_HOME)"
