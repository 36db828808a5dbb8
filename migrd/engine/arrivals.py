"""When each container arrived on this host by a migration: the policy's migration cooldown
for containers (what `Workload.arrived` is for `migrctl run` workloads).

One small file per container, state_dir/arrivals/KIND-NAME.json, written by the target's
commit with the init's PID: a later container of the same name (another init) has not moved.
"""

from __future__ import annotations

import json
from pathlib import Path

from migrd.adapters import private
from migrd.config import Config
from migrd.engine.containers import check_name


def _path(cfg: Config, kind: str, name: str) -> Path:
    check_name(name)
    check_name(kind)
    return cfg.state_dir / "arrivals" / f"{kind}-{name}.json"


def record(cfg: Config, kind: str, name: str, pid: int, when: float) -> None:
    path = _path(cfg, kind, name)
    private.private_dir(path.parent)
    private.write_atomic(path, json.dumps({"pid": pid, "time": when}))


def arrived(cfg: Config, kind: str, name: str, pid: int) -> float | None:
    """When the container whose init is `pid` arrived here (None: it did not move here)."""
    try:
        raw = json.loads(_path(cfg, kind, name).read_text())
        return float(raw["time"]) if raw.get("pid") == pid else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
