#!/usr/bin/env bash
# The small local container image migrd's container tests and demo use: a busybox root
# filesystem built from Debian's busybox-static package (no registry is ever contacted).
# Unpacked with dpkg-deb, never installed: busybox-static conflicts with the busybox package.
# Idempotent: an image whose stamp names the same package version is kept.
#
# Result: $MIGRD_IMAGES/busybox/rootfs (default /var/cache/migrd/images), read-only base of every
# container bundle; the same path on every host (migrd checks it by content before a move).
set -euo pipefail
say() { printf 'build-image: %s\n' "$*" >&2; }

IMAGES=${MIGRD_IMAGES:-/var/cache/migrd/images}
dest=$IMAGES/busybox
version=$(apt-cache policy busybox-static | sed -n 's/^ *Candidate: *//p')
[ -n "$version" ] && [ "$version" != "(none)" ] || { say "ERROR: no busybox-static package in apt's lists"; exit 1; }
# The same image for Podman, as one archive every host loads (so its image ID is the same on
# every host: restoring an exported checkpoint needs the very image ID). Built in a throwaway
# storage, never the system's.
podman_archive() {
    command -v podman >/dev/null || return 0
    [ -f "$dest/podman.tar" ] && return 0
    local tmp
    tmp=$(mktemp -d /tmp/migrd-podman-image.XXXXXX)
    local pm=(podman --root "$tmp/storage" --runroot "$tmp/run" --tmpdir "$tmp/tmp" --cgroup-manager cgroupfs
              --events-backend file)
    tar -C "$dest/rootfs" -c . | "${pm[@]}" import -q - localhost/migrd-busybox:latest >/dev/null
    "${pm[@]}" save -q -o "$dest/podman.tar.new" localhost/migrd-busybox:latest
    chmod 0600 "$dest/podman.tar.new"
    mv "$dest/podman.tar.new" "$dest/podman.tar"
    "${pm[@]}" rmi -a -f >/dev/null 2>&1 || true
    rm -rf "$tmp"
    say "image busybox for podman: $dest/podman.tar"
}

if [ -f "$dest/stamp" ] && [ "$(cat "$dest/stamp")" = "busybox-static $version" ]; then
    say "image busybox present ($dest, busybox-static $version)"; podman_archive; exit 0
fi

umask 077
install -d -m 0700 "$(dirname "$IMAGES")" "$IMAGES"
work=$(mktemp -d /tmp/migrd-image.XXXXXX)
trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get download -q "busybox-static=$version" >&2)
dpkg-deb -x "$work"/busybox-static_*.deb "$work/pkg"

root=$work/rootfs
umask 022
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,root,data}
chmod 1777 "$root/tmp"
install -m 0755 "$work/pkg/bin/busybox" "$root/bin/busybox"
# Every applet as a symlink to /bin/busybox, at the path busybox itself lists.
for applet in $("$root/bin/busybox" --list-full); do
    [ -e "$root/$applet" ] || ln -s /bin/busybox "$root/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' > "$root/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$root/etc/group"
printf 'migrd busybox image (busybox-static %s)\n' "$version" > "$root/etc/motd"
printf '0\n' > "$root/data/counter"

rm -rf "$dest.new"
install -d -m 0700 "$dest.new"
mv "$root" "$dest.new/rootfs"
printf 'busybox-static %s\n' "$version" > "$dest.new/stamp"
chmod 0600 "$dest.new/stamp"
rm -rf "$dest"
mv "$dest.new" "$dest"
say "built image busybox ($dest/rootfs, busybox-static $version)"
podman_archive
