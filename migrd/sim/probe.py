"""Which peers a simulated host reads each round: the agent's own choice (`migrd.peerset`,
the `daemon.probe` setting), by host index."""

from __future__ import annotations

import random
from collections.abc import Sequence

from migrd.core.peerset import PeerSet, Probe, Ring



class Prober:
    """The peers host i reads this round (indices), chosen by `migrd.peerset.PeerSet`."""

    def __init__(self, probe: str, names: Sequence[str], rng: random.Random) -> None:
        spec = Probe.parse(probe)
        self.rng = rng
        self.index = {n: i for i, n in enumerate(names)}
        ring = Ring(names) if spec.kind == "fingers" else None
        self.sets = [PeerSet(spec, n, [*names[:i], *names[i + 1:]], ring) for i, n in enumerate(names)]
        # A fixed set (all, fingers) is looked up once, not every round.
        self.fixed = [None if s.fixed is None else [self.index[p] for p in s.fixed] for s in self.sets]

    def peers(self, i: int) -> list[int]:
        fixed = self.fixed[i]
        if fixed is not None:
            return fixed
        return [self.index[p] for p in self.sets[i].this_round(self.rng)]
