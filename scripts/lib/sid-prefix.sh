# Sourced, not run: unpack a Debian package from another suite (sid by default) with its whole
# library closure into a private prefix, never touching the system's libc or dpkg database. The
# programs run through the closure's own dynamic loader (see prefix_wrapper). Used by
# install-criu.sh and install-pypy.sh; the caller defines say and die.

# unpack_closure SUITE PACKAGE STAGE: download PACKAGE and everything it depends on from SUITE
# (apt with an empty dpkg status fetches the whole closure) and unpack it all into STAGE/root.
unpack_closure() {
    local suite=$1 pkg=$2 stage=$3 src=/etc/apt/sources.list.d/debian.sources uri keyring
    uri=$(sed -n 's/^URIs: *//p' "$src" 2>/dev/null | head -1)
    keyring=$(sed -n 's/^Signed-By: *//p' "$src" 2>/dev/null | head -1)
    uri=${uri:-http://deb.debian.org/debian}
    keyring=${keyring:-/usr/share/keyrings/debian-archive-keyring.gpg}
    mkdir -p "$stage/lists/partial" "$stage/archives/partial" "$stage/root"
    echo "deb [signed-by=$keyring] $uri $suite main" > "$stage/sources.list"
    : > "$stage/status"
    local apt_opts=(-q -o "Dir::Etc::SourceList=$stage/sources.list" -o Dir::Etc::SourceParts=/dev/null
                    -o "Dir::State::Lists=$stage/lists" -o "Dir::State::status=$stage/status"
                    -o "Dir::Cache::archives=$stage/archives" -o Debug::NoLocking=1
                    -o APT::Sandbox::User=root)
    apt-get "${apt_opts[@]}" update >&2 || die "apt-get update for Debian $suite failed"
    apt-get "${apt_opts[@]}" -y --no-install-recommends install --download-only "$pkg" >&2 \
        || die "could not download $pkg and its libraries from Debian $suite"
    local deb
    for deb in "$stage"/archives/*.deb; do dpkg -x "$deb" "$stage/root"; done
    [ -x "$stage/root/usr/lib64/ld-linux-x86-64.so.2" ] \
        || die "no dynamic loader in the unpacked closure of $pkg (only x86_64 is supported)"
}

# prefix_wrapper PREFIX SUITE PROGRAM LIBDIRS: print a shell wrapper that runs PROGRAM (a path
# inside PREFIX/root) through the closure's loader with LIBDIRS (':'-separated, inside
# PREFIX/root) as its library path.
prefix_wrapper() {
    local prefix=$1 suite=$2 program=$3 libdirs=$4 lib path="" dirs
    IFS=: read -ra dirs <<< "$libdirs"
    for lib in "${dirs[@]}"; do path="$path${path:+:}\$R$lib"; done
    cat <<WRAP
#!/bin/sh
# $(basename "$program") from Debian $suite with its own libraries, run through their loader (scripts/lib/sid-prefix.sh).
R=$prefix/root
exec "\$R/usr/lib64/ld-linux-x86-64.so.2" --library-path "$path" "\$R$program" "\$@"
WRAP
}

# install_prefix STAGE PREFIX SUITE NAME PROGRAM LIBDIRS: make STAGE/root (from unpack_closure)
# the prefix PREFIX, with PREFIX/bin/NAME the wrapper that runs PROGRAM (prefix_wrapper). The
# new prefix is built beside the old one and moved into place; the old one goes.
install_prefix() {
    local stage=$1 prefix=$2 suite=$3 name=$4 program=$5 libdirs=$6 new=$2.new
    rm -rf "$new"; mkdir -p "$new/bin"
    mv "$stage/root" "$new/root"
    prefix_wrapper "$prefix" "$suite" "$program" "$libdirs" > "$new/bin/$name"
    chmod 755 "$new/bin/$name"
    rm -rf "$prefix.old"; [ -e "$prefix" ] && mv "$prefix" "$prefix.old"
    mv "$new" "$prefix"; rm -rf "$prefix.old"
}
