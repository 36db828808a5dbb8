"""One agent round as a pure function: the agent (`migrd/agent/loop.py`) and the simulator
(`migrd/sim`) both call `step`, so what the simulator measures is the agent's own logic.

    (state, this round's inputs, settings) -> (new state, situation, decision, what to do)

The caller gathers the inputs (its load sample, the peers' snapshots with links, its
candidates, whether it is paused) and carries out the outcome (publish the level, record the
decision, migrate, ask a peer for work). No I/O here: no clock, no files, no network.

State carried between rounds: the load history (for the hold time), the level (hysteresis),
when this host last moved (host cooldown), when it last asked for work (fill), and the offers
idle peers queued with it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

from migrd.core import policy
from migrd.model import Action, Candidate, Decision, HostLoad, Level, Mode, Peer, PolicyConfig, Situation

#: An offer from an idle peer is acted on only this long (seconds) after it came.
OFFER_TTL = 30.0


@dataclass(frozen=True)
class Settings:
    host: str
    #: daemon.mode as configured: offload, fill or consolidate.
    mode: str
    #: Seconds between rounds (daemon.interval).
    interval: float
    policy: PolicyConfig


@dataclass(frozen=True)
class State:
    history: tuple[HostLoad, ...] = ()
    level: Level = Level.NORMAL
    last_move_at: float | None = None
    asked_at: float | None = None
    #: Idle peer -> when it offered to take work. Never mutated: `offered` returns a new State.
    offers: Mapping[str, float] = field(default_factory=dict)

    def offered(self, requester: str, at: float) -> State:
        return replace(self, offers={**self.offers, requester: at})


@dataclass(frozen=True)
class Inputs:
    sample: HostLoad
    #: Any sequence: the simulator's are built only when the policy first looks at them.
    peers: Sequence[Peer]
    candidates: Sequence[Candidate]
    paused: bool = False


@dataclass(frozen=True)
class Step:
    state: State
    situation: Situation
    decision: Decision
    #: Carry out the decision's move now (a move, and not paused).
    move: bool
    #: Why a move was decided but not carried out ("paused"), else None.
    skipped: str | None
    #: Fill mode: the busy peer to ask for work this round, else None.
    ask: str | None


def keep_history(history: Sequence[HostLoad], sample: HostLoad, keep_s: float) -> tuple[HostLoad, ...]:
    """Append sample; drop samples older than keep_s (the policy's hold time needs no more).
    The history is in time order, so only a prefix is ever dropped."""
    kept = (*history, sample)
    first = 0
    while sample.time - kept[first].time > keep_s:
        first += 1
    return kept[first:]


_OWN_MODE = {m.value: None if m is Mode.FILL else m for m in Mode}


def own_mode(configured: str) -> Mode | None:
    """The mode this host decides in on its own (fill: none, it waits to be asked)."""
    return _OWN_MODE[configured]


def fill_source(configured: str, local: HostLoad, peers: Sequence[Peer], cfg: PolicyConfig,
                level: Level) -> str | None:
    """Fill mode: which busy peer a lightly loaded host asks for work (None: nobody)."""
    if level is not Level.LOW or configured != Mode.FILL.value:
        return None
    return policy.pick_fill_source(local, peers, cfg)


def waiting_decision(level: Level, reasons: Sequence[str], host: str) -> Decision:
    return Decision(Action.STAY, Mode.FILL, level, host,
                    reasons=(*reasons, "fill mode: this host moves work only when an idle peer asks"))


def take_offer(offers: Mapping[str, float], now: float) -> tuple[str | None, dict[str, float]]:
    """The oldest live offer's requester (None: none), and the live offers left after it."""
    if not offers:
        return None, {}
    live = {h: t for h, t in offers.items() if now - t <= OFFER_TTL}
    requester = min(live, key=live.__getitem__) if live else None
    return requester, {h: t for h, t in live.items() if h != requester}


def idle(state: State, sample: HostLoad, s: Settings) -> State | None:
    """The state `step` would leave after this round, if the round provably ends before looking
    at a peer or a candidate: no offer to take, and offload or consolidate in the host cooldown
    or without the level it needs, or fill (not asked) with nothing to ask. Then `step` neither
    moves nor asks, whatever the peers and candidates; only its decision's text is not made
    here. None: call `step`. The simulator asks this first on every round (at 80 % load half
    of all rounds end here); tests/test_sim.py checks it against `step` round by round."""
    if state.offers:
        return None
    pc = s.policy
    now = sample.time
    history = keep_history(state.history, sample, pc.hold_s + 3 * s.interval)
    level = policy.level(history, pc, state.level)
    mode = own_mode(s.mode)
    if mode is None:
        if level is Level.LOW and (state.asked_at is None or now - state.asked_at >= pc.host_cooldown_s):
            return None  # it may ask a busy peer for work
    elif not policy.cooling(state.last_move_at, now, pc) and level is policy.NEEDS[mode]:
        return None
    return State(history, level, state.last_move_at, state.asked_at, {})


def step(state: State, inp: Inputs, s: Settings) -> Step:
    """One round: keep the history, take the oldest live offer (it makes this a fill decision
    with the asker as the only target), decide, then either move (starting the host cooldown)
    or, in fill mode when lightly loaded, name the busy peer to ask (once per host cooldown).
    A paused host decides as usual but neither moves nor asks."""
    pc = s.policy
    now = inp.sample.time
    history = keep_history(state.history, inp.sample, pc.hold_s + 3 * s.interval)
    requester, offers = take_offer(state.offers, now)
    mode = Mode.FILL if requester else own_mode(s.mode)
    sit = Situation(now=now, history=history, peers=inp.peers, candidates=inp.candidates,
                    mode=mode or Mode.FILL, previous_level=state.level,
                    last_move_at=state.last_move_at, requester=requester)
    if mode is None:
        level, why = policy.classify(history, pc, state.level)
        d = waiting_decision(level, why, s.host)
    else:
        d = policy.decide(sit, pc)
    wants_move = d.action is not Action.STAY and d.target is not None
    if wants_move and not inp.paused:
        return Step(State(history, d.level, now, state.asked_at, offers), sit, d, True, None, None)
    ask = None
    if not inp.paused and (state.asked_at is None or now - state.asked_at >= pc.host_cooldown_s):
        ask = fill_source(s.mode, inp.sample, inp.peers, pc, d.level)
    new = State(history, d.level, state.last_move_at, now if ask else state.asked_at, offers)
    return Step(new, sit, d, False, "paused" if wants_move else None, ask)
