#!/usr/bin/env bash
# Install a CRIU that works on this kernel, or confirm the one already here does.
#
# Acceptance is a proof, not a version string: `criu check` must pass, the version must be
# >= 4.2 (4.1 cannot dump any process holding an AF_INET socket on Linux >= 6.16), and a real
# dump + restore of a process that holds a listening TCP socket must succeed.
#
# Order: $MIGRD_CRIU, a system `criu` on PATH, the private prefix /opt/migrd/criu (reused if it
# already proves itself), else a fresh private-prefix install of Debian sid's criu and its
# library closure, run through the prefix's own dynamic loader so the system libc is never
# touched.
set -euo pipefail

PREFIX=${MIGRD_CRIU_PREFIX:-/opt/migrd/criu}
SUITE=${MIGRD_CRIU_SUITE:-sid}
MIN_VERSION=4.2

say() { printf 'install-criu: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# shellcheck source=lib/sid-prefix.sh
. "$(dirname "$0")/lib/sid-prefix.sh"

version_ok() { # $1 = criu binary/wrapper
    local v
    v=$("$1" --version 2>/dev/null | sed -n 's/^Version: *//p' | head -1) || return 1
    [ -n "$v" ] || return 1
    [ "$(printf '%s\n%s\n' "$MIN_VERSION" "$v" | sort -V | head -1)" = "$MIN_VERSION" ]
}

# Dump and restore a Python process that listens on 127.0.0.1, then check it still answers.
# Runs in a throwaway network namespace (see prove) so CRIU's network-lock table cannot linger.
# The process leads its own session: a runner that starts us without setsid (CI does) leaves
# us in the kernel's session 0, whose leader CRIU cannot find ("session leader ... is outside
# of its pid namespace"), even with --shell-job.
prove_here() { # $1 = criu binary/wrapper
    ip link set lo up
    local criu=$1 work pid port rc=1
    work=$(mktemp -d /tmp/migrd-criu-proof.XXXXXX)
    cat > "$work/server.py" <<'PY'
import socket, sys, os, time
os.closerange(3, 65536)  # descriptors a runner leaked to us would have to be dumped too
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(4)
open(os.path.join(sys.argv[1], "port"), "w").write(str(s.getsockname()[1]))
deadline = time.time() + 60   # never outlive the proof by much
s.settimeout(1)
while time.time() < deadline:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.sendall(b"alive\n"); c.close()
PY
    setsid python3 "$work/server.py" "$work" </dev/null >/dev/null 2>&1 &
    pid=$!
    disown "$pid" 2>/dev/null || true
    for _ in $(seq 50); do [ -s "$work/port" ] && break; sleep 0.1; done
    port=$(cat "$work/port" 2>/dev/null || true)
    mkdir "$work/img"
    if [ -n "$port" ] \
        && "$criu" dump -t "$pid" -D "$work/img" --tcp-established \
               --network-lock nftables -o dump.log 2>/dev/null; then
        # The dumped task is gone once its zombie is reaped; we are its parent, so wait here.
        wait "$pid" 2>/dev/null || true
        if "$criu" restore -D "$work/img" -d --tcp-established \
               --network-lock nftables -o restore.log 2>/dev/null; then
            if python3 -c "import socket,sys; c=socket.create_connection(('127.0.0.1',int(sys.argv[1])),5); sys.exit(0 if c.recv(16)==b'alive\n' else 1)" "$port"; then
                rc=0
            fi
        fi
    fi
    [ $rc -eq 0 ] || { say "proof failed with $criu; logs:"; tail -n 12 "$work"/img/*.log >&2 2>/dev/null || true; }
    kill -9 "$pid" 2>/dev/null || true
    rm -rf "$work"
    return $rc
}

prove() { unshare --net -- bash "$0" --prove "$1"; }

qualifies() { # $1 = candidate
    local c=$1
    [ -x "$c" ] || command -v "$c" >/dev/null 2>&1 || return 1
    "$c" check >/dev/null 2>&1 || { say "$c: 'criu check' fails"; return 1; }
    version_ok "$c" || { say "$c: version $("$c" --version | sed -n 's/^Version: *//p') is older than $MIN_VERSION"; return 1; }
    prove "$c" || return 1
}

if [ "${1:-}" = --prove ]; then prove_here "$2"; exit; fi
[ "$(id -u)" = 0 ] || die "must run as root (CRIU needs CAP_SYS_ADMIN and friends)"

if [ -n "${MIGRD_CRIU:-}" ] && qualifies "$MIGRD_CRIU"; then
    say "using \$MIGRD_CRIU=$MIGRD_CRIU"; exit 0
fi
if command -v criu >/dev/null 2>&1 && qualifies "$(command -v criu)"; then
    say "using system $(command -v criu)"; exit 0
fi
if [ -x "$PREFIX/bin/criu" ] && qualifies "$PREFIX/bin/criu"; then
    say "using existing $PREFIX/bin/criu ($("$PREFIX/bin/criu" --version | head -1))"; exit 0
fi

say "installing CRIU from Debian $SUITE into $PREFIX (private prefix; the system libc is not touched)"
stage=$(mktemp -d /tmp/migrd-criu-install.XXXXXX)
trap 'rm -rf "$stage"' EXIT
unpack_closure "$SUITE" criu "$stage"
[ -x "$stage/root/usr/sbin/criu" ] || die "the criu package did not contain usr/sbin/criu"
install_prefix "$stage" "$PREFIX" "$SUITE" criu /usr/sbin/criu /usr/lib/x86_64-linux-gnu
qualifies "$PREFIX/bin/criu" || die "installed $PREFIX/bin/criu but it does not pass the proof (see messages above)"
say "installed $("$PREFIX/bin/criu" --version | head -1) at $PREFIX/bin/criu"
