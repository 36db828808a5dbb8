"""Which peers a host reads each round (`daemon.probe`): all of them, or O(log N). Pure: the
agent (migrd/registry.py) and the simulator (migrd/sim) both choose through `PeerSet`.

* `all`: every other host (N - 1 reads per host per round).
* `fingers`: a Chord-style finger set over a hash ring of host names: the successors of
  position + 2^k for each k < 64, about log2 N distinct hosts, the same every round. It needs
  only the names, so every host can work out every other host's set without talking.
* `random` (`random:D`): power-of-d choices: D hosts drawn afresh every round (default
  ceil(log2 N)).
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

KINDS = ("all", "fingers", "random")
RING_BITS = 64


def ring_position(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")


def fanout(n: int) -> int:
    """d for power-of-d probing among n hosts: ceil(log2 n), at least 1."""
    return max(1, math.ceil(math.log2(max(n, 2))))


class Ring:
    """Host names placed on a 64-bit ring by SHA-1."""

    def __init__(self, names: Sequence[str]) -> None:
        ring = sorted((ring_position(n), n) for n in set(names))
        self.positions = [p for p, _ in ring]
        self.names = [n for _, n in ring]

    def fingers(self, name: str) -> list[str]:
        """name's finger set: the successor of position + 2^k for k < 64, without name itself,
        each host once, in k order."""
        pos = ring_position(name)
        seen: dict[str, None] = {}
        for k in range(RING_BITS):
            at = bisect.bisect_left(self.positions, (pos + (1 << k)) % (1 << RING_BITS)) % len(self.names)
            if self.names[at] != name:
                seen[self.names[at]] = None
        return list(seen)


@dataclass(frozen=True)
class Probe:
    """A parsed `daemon.probe` setting."""

    kind: str = "all"
    #: random: peers drawn per round (None: ceil(log2 N)).
    d: int | None = None

    @classmethod
    def parse(cls, text: str) -> Probe:
        """'all', 'fingers', 'random' or 'random:D' (D >= 1); ValueError says what is wrong."""
        kind, sep, arg = text.strip().partition(":")
        if kind not in KINDS or (sep and kind != "random"):
            raise ValueError(f"{text!r} is not one of all, fingers, random, random:D")
        if not sep:
            return cls(kind)
        if not arg.isdigit() or int(arg) < 1:
            raise ValueError(f"{text!r}: D in random:D must be a whole number >= 1")
        return cls(kind, int(arg))

    def __str__(self) -> str:
        return self.kind if self.d is None else f"{self.kind}:{self.d}"


class PeerSet:
    """The peers one host reads each round, out of `others` (every host but itself)."""

    def __init__(self, probe: Probe, me: str, others: Sequence[str], ring: Ring | None = None) -> None:
        self.probe = probe
        self.others = list(others)
        n = len(self.others) + 1
        self.d = min(probe.d or fanout(n), len(self.others))
        self.fixed: list[str] | None = None
        if probe.kind == "all":
            self.fixed = self.others
        elif probe.kind == "fingers":
            mine = set(self.others)
            ring = ring or Ring([me, *self.others])
            self.fixed = [p for p in ring.fingers(me) if p in mine]

    def this_round(self, rng: random.Random) -> list[str]:
        """Whom to read now (fingers and all: the same every round; random: a fresh draw)."""
        if self.fixed is not None:
            return self.fixed
        return rng.sample(self.others, self.d)
