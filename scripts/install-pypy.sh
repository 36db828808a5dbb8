#!/usr/bin/env bash
# Install PyPy for the simulator (`migrctl sim`), or confirm the one already here works.
#
# The simulator is pure Python and spends its time in migrd's policy code; PyPy's JIT runs that
# same code, unchanged, several times faster over an hour of simulated cluster time (docs/sim.md,
# "Speed"). Nothing else in migrd uses it, and `migrctl sim` runs in-process without it.
#
# Acceptance is a proof: the interpreter must be PyPy for Python >= 3.11 (migrd's floor; Debian
# 12's pypy3 is 3.9) and must import migrd's simulator from this checkout.
#
# Order: $MIGRD_PYPY (what migrd uses when set), the private prefix /opt/migrd/pypy (reused if it
# passes), else a fresh private-prefix install of Debian sid's pypy3 with its library closure,
# run through the prefix's own dynamic loader (as install-criu.sh does for CRIU).
set -euo pipefail

PREFIX=${MIGRD_PYPY_PREFIX:-/opt/migrd/pypy}
SUITE=${MIGRD_PYPY_SUITE:-sid}
HERE=$(cd "$(dirname "$0")" && pwd)

say() { printf 'install-pypy: %s\n' "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }
# shellcheck source=lib/sid-prefix.sh
. "$HERE/lib/sid-prefix.sh"

qualifies() { # $1 = candidate interpreter
    local c=$1 out
    [ -x "$c" ] || return 1
    out=$(cd / && PYTHONPATH="$HERE/.." "$c" -c '
import sys
import migrd.sim.engine
ok = sys.implementation.name == "pypy" and sys.version_info >= (3, 11)
print(sys.implementation.name, "%d.%d" % sys.version_info[:2])
sys.exit(0 if ok else 1)' 2>&1) || { say "$c does not qualify: ${out##*$'\n'}"; return 1; }
}

[ "$(id -u)" = 0 ] || die "must run as root (it writes $PREFIX)"
if [ -n "${MIGRD_PYPY:-}" ]; then  # migrctl sim would run it: it must pass, no fallback
    qualifies "$MIGRD_PYPY" || die "\$MIGRD_PYPY=$MIGRD_PYPY is not a PyPy for Python >= 3.11"
    say "using \$MIGRD_PYPY=$MIGRD_PYPY"; exit 0
fi
if [ -x "$PREFIX/bin/pypy3" ] && qualifies "$PREFIX/bin/pypy3"; then
    say "using existing $PREFIX/bin/pypy3"; exit 0
fi

say "installing PyPy from Debian $SUITE into $PREFIX (private prefix; the system libc is not touched)"
stage=$(mktemp -d /tmp/migrd-pypy-install.XXXXXX)
trap 'rm -rf "$stage"' EXIT
unpack_closure "$SUITE" pypy3 "$stage"
# The interpreter is a small launcher for libpypy3.N-c.so; find where the package put it.
shared=$(cd "$stage/root" && find usr/lib -name 'libpypy3*-c.so' -printf '/%h\n' -quit)
[ -x "$stage/root/usr/bin/pypy3" ] && [ -n "$shared" ] \
    || die "the pypy3 package did not contain usr/bin/pypy3 and its libpypy3-c.so"
libdirs=/usr/lib/x86_64-linux-gnu
[ "$shared" = "$libdirs" ] || libdirs="$libdirs:$shared"
install_prefix "$stage" "$PREFIX" "$SUITE" pypy3 /usr/bin/pypy3 "$libdirs"
qualifies "$PREFIX/bin/pypy3" || die "installed $PREFIX/bin/pypy3 but it does not pass the proof (see above)"
say "installed $("$PREFIX/bin/pypy3" -c 'import sys; print(sys.version.splitlines()[-1])') at $PREFIX/bin/pypy3"
