"""Addresses and CRIU's network-lock leftovers, through iproute2, arping and nft (adapter)."""

from __future__ import annotations

import ipaddress
import json

from migrd.adapters import command
from migrd.errors import CommandError, InputError


def parse_cidr(cidr: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    try:
        iface = ipaddress.ip_interface(cidr)
    except ValueError:
        raise InputError(f"{cidr!r} is not an address with prefix length (e.g. 198.18.0.100/24)") from None
    if "/" not in cidr:
        raise InputError(f"{cidr!r} needs a prefix length (e.g. {cidr}/24)")
    return iface


def _addrs() -> list[tuple[str, ipaddress.IPv4Interface | ipaddress.IPv6Interface]]:
    out = json.loads(command.run(["ip", "-j", "addr", "show"]).stdout or b"[]")
    return [(link["ifname"], ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}"))
            for link in out for a in link.get("addr_info", [])]


def holder_of(cidr: str) -> str | None:
    """The interface that carries exactly this address, if any."""
    want = parse_cidr(cidr).ip
    return next((ifname for ifname, a in _addrs() if a.ip == want), None)


def interface_for(cidr: str) -> str | None:
    """An interface with another address in the same network: where the address can live."""
    net = parse_cidr(cidr).network
    return next((ifname for ifname, a in _addrs() if a.ip in net and a.ip != parse_cidr(cidr).ip), None)


def loopback_up() -> bool:
    out = json.loads(command.run(["ip", "-j", "link", "show", "lo"], check=False).stdout or b"[]")
    return bool(out) and "UP" in out[0].get("flags", [])


def add(cidr: str, ifname: str) -> None:
    command.run(["ip", "addr", "add", cidr, "dev", ifname])


def delete(cidr: str) -> None:
    ifname = holder_of(cidr)
    if ifname:
        command.run(["ip", "addr", "del", cidr, "dev", ifname])


def announce(cidr: str, ifname: str) -> str | None:
    """Tell the neighbours the address moved, so clients switch at once instead of after TCP
    back-off (measured on the bed: ~54 s stall without, ~3 s with). Returns why it could not
    be sent, or None: by then the process runs here, so a failed announcement is reported,
    not undone."""
    ip = parse_cidr(cidr).ip
    if ip.version == 4:
        argv = ["arping", "-U", "-c", "2", "-w", "2", "-I", ifname, str(ip)]
    else:
        # The kernel sends an unsolicited neighbour advertisement for a new IPv6 address
        # itself (ndisc_notify); asking for it keeps this explicit.
        argv = ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.ndisc_notify=1"]
    try:
        cp = command.run(argv, check=False, timeout=10)
    except CommandError as e:
        return str(e)
    if cp.returncode != 0:
        return f"{argv[0]} exited {cp.returncode}: {command.last_line(cp.stderr)}"
    return None


#: CRIU's network lock with nftables (criu/netfilter.c) names its table after the dump's run id.
CRIU_TABLE_PREFIX = "inet CRIU-"


def nft_tables() -> set[str]:
    """'family name' of every nftables table in this network namespace."""
    cp = command.run(["nft", "-j", "list", "tables"], check=False)
    if cp.returncode != 0:
        return set()
    items = json.loads(cp.stdout or b"{}").get("nftables", [])
    return {f"{t['table']['family']} {t['table']['name']}" for t in items if "table" in t}


def tables_of_dump(tables: set[str], inventory: bytes) -> list[str]:
    """The network-lock tables one dump made: CRIU names its table `inet CRIU-<run id>` and
    writes that run id into the dump's inventory.img. Matching by it never picks another
    migration's table, as a before/after difference of the host's tables could."""
    return sorted(t for t in tables
                  if t.startswith(CRIU_TABLE_PREFIX) and len(t) > len(CRIU_TABLE_PREFIX)
                  and t[len(CRIU_TABLE_PREFIX):].encode() in inventory)


def nft_delete(table: str) -> None:
    family, name = table.split(" ", 1)
    command.run(["nft", "delete", "table", family, name], check=False)
