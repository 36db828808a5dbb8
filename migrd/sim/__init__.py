"""`migrctl sim`: a discrete-event simulation of a cluster running migrd's policy (through the
agent's own round, `migrd.core.step`) against baseline rules, on one seeded workload. Pure: no I/O.
docs/sim.md describes the model and the results."""

from migrd.sim.engine import POLICIES, Result, SimConfig, run

__all__ = ["POLICIES", "Result", "SimConfig", "run"]
