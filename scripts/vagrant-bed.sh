#!/usr/bin/env bash
# `make vagrant-up` / `make vagrant-down`: the Vagrant multi-VM bed on libvirt + QEMU.
#
#   up:   Debian packages (no recommends), libvirt's daemons if nothing runs them, /dev/kvm
#         group access, `vagrant up` of the Vagrantfile's VMs (the box comes from `make box`).
#   down: everything up created: the VMs and their volumes, the box's volume in libvirt's
#         storage pool, the libvirt networks, libvirt's firewall chains, the daemons it started
#         (by PID), /dev/kvm's mode, the cluster keys.
#
# System changes, each undone by down: /dev/kvm group kvm mode 0660 (as Debian's udev rule sets
# it; left root-only, libvirt re-probes QEMU on every call, ~4x slower), virtlogd and libvirtd
# started when none runs (PID 1 here is not systemd), libvirt networks migrd-mgmt
# (198.19.250.0/24) and migrd-private (198.18.1.0/24), both without forwarding.
set -euo pipefail
say() { printf 'vagrant-bed: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
[ "$(id -u)" = 0 ] || die "must run as root"

here=$(cd "$(dirname "$0")/.." && pwd)
BASE=${MIGRD_VAGRANT_DIR:-/var/lib/migrd-vagrant}
export VAGRANT_HOME=${VAGRANT_HOME:-$BASE/home}
export LIBVIRT_DEFAULT_URI=qemu:///system
RUN=/run/migrd-vagrant            # pidfiles of the daemons up started, /dev/kvm's old mode
NETWORKS=(migrd-mgmt migrd-private)
BOX_VOLUME_PREFIX=migrd-VAGRANTSLASH-trixie
PKGS=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients
      qemu-system-x86 qemu-utils debootstrap dnsmasq-base rsync)

packages() {
    local missing=() p
    for p in "${PKGS[@]}"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    say "installing ${missing[*]} (without recommends: never Debian's criu)"
    local policy=/usr/sbin/policy-rc.d added=0
    # libvirt's packages would start their daemons; up starts them itself, by PID.
    if [ ! -e $policy ]; then printf '#!/bin/sh\nexit 101\n' > $policy; chmod 755 $policy; added=1; fi
    apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" >&2
    local rc=$?
    [ $added = 1 ] && rm -f $policy
    [ $rc = 0 ] || die "apt-get install failed"
}

alive() { # $1 = pidfile, $2 = expected command name
    [ -f "$1" ] && [ "$(cat "/proc/$(cat "$1" 2>/dev/null)/comm" 2>/dev/null)" = "$2" ]  # the daemon may remove its pidfile as it exits
}

daemons() {
    install -d -m 0700 "$RUN"
    if [ ! -S /run/libvirt/virtlogd-sock ]; then
        virtlogd -d -p "$RUN/virtlogd.pid"
        say "started virtlogd (PID $(cat "$RUN/virtlogd.pid"))"
    fi
    if ! virsh -q version >/dev/null 2>&1; then
        # QEMU inherits libvirtd's niceness: emulated guests must not starve the host's work.
        nice -n 10 libvirtd -d -p "$RUN/libvirtd.pid"
        for _ in $(seq 100); do virsh -q version >/dev/null 2>&1 && break; sleep 0.2; done
        virsh -q version >/dev/null 2>&1 || die "libvirtd did not answer"
        say "started libvirtd (PID $(cat "$RUN/libvirtd.pid"), nice 10)"
    fi
}

kvm_group() {
    [ -c /dev/kvm ] || return 0
    local now
    now=$(stat -c '%U:%G %a' /dev/kvm)
    [ "$now" = "root:kvm 660" ] && return 0
    [ -f "$RUN/kvm.mode" ] || echo "$now" > "$RUN/kvm.mode"
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
    say "/dev/kvm: $now -> root:kvm 660 (libvirt's QEMU probe needs it; down restores it)"
}

up() {
    packages
    bash "$here/scripts/build-box.sh"
    daemons
    kvm_group
    # vagrant-libvirt defines the pool "default" when it is missing; down removes it then.
    virsh -q pool-info default >/dev/null 2>&1 || touch "$RUN/pool.created"
    local t0=$SECONDS
    (cd "$here" && nice -n 10 vagrant up --provider libvirt) || die "vagrant up failed"
    say "vagrant up took $((SECONDS - t0)) s"
}

down() {
    if [ -d "$here/.vagrant" ] && command -v vagrant >/dev/null && virsh -q version >/dev/null 2>&1; then
        (cd "$here" && vagrant destroy -f) || say "vagrant destroy failed (continuing)"
    fi
    if virsh -q version >/dev/null 2>&1; then
        local vol net
        for vol in $(virsh -q vol-list default 2>/dev/null | awk '{print $1}'); do
            case $vol in "$BOX_VOLUME_PREFIX"*|migrd-host[0-9]*.img) virsh -q vol-delete "$vol" --pool default >/dev/null \
                && say "removed volume $vol";; esac
        done
        for net in "${NETWORKS[@]}"; do
            virsh -q net-info "$net" >/dev/null 2>&1 || continue
            virsh -q net-destroy "$net" >/dev/null 2>&1 || true
            virsh -q net-undefine "$net" >/dev/null && say "removed network $net"
        done
        if [ -f "$RUN/pool.created" ] && virsh -q pool-info default >/dev/null 2>&1; then
            virsh -q pool-destroy default >/dev/null 2>&1 || true
            virsh -q pool-undefine default >/dev/null && say "removed storage pool default"
        fi
        rm -f "$RUN/pool.created"
    fi
    local d
    for d in libvirtd virtlogd; do
        if alive "$RUN/$d.pid" "$d"; then
            kill "$(cat "$RUN/$d.pid")"
            for _ in $(seq 50); do alive "$RUN/$d.pid" "$d" || break; sleep 0.1; done
            say "stopped $d"
        fi
        rm -f "$RUN/$d.pid"
    done
    # libvirt's firewall chains (only where iptables exists; libvirt made them for its networks).
    if command -v iptables >/dev/null; then
        local t c
        for t in filter nat mangle; do
            for c in $(iptables -t $t -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
                iptables -t $t -F "$c" 2>/dev/null || true
            done
            iptables -t $t -S 2>/dev/null | awk '$1=="-A" && /-j LIBVIRT_/' | sed 's/^-A //' | while read -r rule; do
                eval iptables -t $t -D $rule || true
            done
            for c in $(iptables -t $t -S 2>/dev/null | awk '$1=="-N" && $2 ~ /^LIBVIRT_/ {print $2}'); do
                iptables -t $t -X "$c" && say "removed iptables chain $t/$c"
            done
        done
    fi
    if [ -f "$RUN/kvm.mode" ]; then
        read -r owner mode < "$RUN/kvm.mode"
        chown "$owner" /dev/kvm && chmod "$mode" /dev/kvm && say "/dev/kvm back to $owner $mode"
        rm -f "$RUN/kvm.mode"
    fi
    rm -rf "$here/.vagrant" "$here/.vagrant-cluster"
    rmdir "$RUN" 2>/dev/null || true
}

case ${1:-} in
    up) up ;;
    down) down ;;
    *) die "usage: $0 up|down" ;;
esac
