"""Which peers a host reads each round: all of them, or O(log N).

* `all`: every other host (N - 1 snapshot reads per host per round).
* `fingers`: a Chord-style finger set over a hash ring of host names: the successors of
  position + 2^k for each k, about log2 N distinct hosts, the same every round. Deterministic
  from the names alone, so every host can compute every other host's set without talking.
* `random`: power-of-d choices: d = ceil(log2 N) hosts drawn afresh every round.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence

PROBES = ("all", "fingers", "random")
RING_BITS = 64


def ring_position(name: str) -> int:
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big")


def fingers(names: Sequence[str]) -> list[list[int]]:
    """For each host (by index), its finger set (indices), successors of pos + 2^k, k < 64."""
    ring = sorted((ring_position(n), i) for i, n in enumerate(names))
    positions = [p for p, _ in ring]
    out = []
    for i, name in enumerate(names):
        pos = ring_position(name)
        seen: dict[int, None] = {}
        for k in range(RING_BITS):
            at = bisect.bisect_left(positions, (pos + (1 << k)) % (1 << RING_BITS)) % len(ring)
            j = ring[at][1]
            if j != i:
                seen[j] = None
        out.append(list(seen))
    return out


def fanout(n: int) -> int:
    """d for power-of-d probing: ceil(log2 N), at least 1."""
    return max(1, math.ceil(math.log2(max(n, 2))))


class Prober:
    """The peers host i reads this round (indices)."""

    def __init__(self, kind: str, names: Sequence[str], rng: random.Random) -> None:
        self.kind, self.n, self.rng = kind, len(names), rng
        if kind == "fingers":
            self.sets = fingers(names)
        elif kind == "all":
            self.sets = [[j for j in range(self.n) if j != i] for i in range(self.n)]
        self.d = min(fanout(self.n), self.n - 1)

    def peers(self, i: int) -> list[int]:
        if self.kind != "random":
            return self.sets[i]
        picks = self.rng.sample(range(self.n - 1), self.d)
        return [j + (j >= i) for j in picks]  # skip i itself
