"""Drive one post-copy move with migrd.engine.lazy directly (run inside a bed host):
`python postcopy_drive.py PID TARGET`; prints the outcome as JSON on stdout. Steps are
journalled in state_dir/migrations/ID like a migration's, failpoints honoured."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from migrd.adapters import procinfo, transport, workloads
from migrd.cli.common import load_config
from migrd.engine import failpoints, lazy
from migrd.engine.journal import Journal, new_id
from migrd.errors import MigrdError, WorkloadLost


def main() -> int:
    pid, target = int(sys.argv[1]), sys.argv[2]
    cfg = load_config()
    info = procinfo.inspect(pid)
    w = workloads.Registry(cfg.state_dir).by_pid(pid)
    j = Journal(cfg.state_dir / "migrations" / new_id())
    j.record("precheck", request={"pid": pid, "start_time": info.start_time, "target": target})

    def begin(step: str, **data) -> None:
        j.record(step, **data)
        failpoints.step(step)

    with transport.connect(cfg, target) as conn:
        try:
            moved = lazy.move(cfg, conn, pid, info.start_time, j.dir / "images", j.id, begin, j.record,
                              name=w.name if w else None, stdout=w.stdout if w else None,
                              send_carried=lambda: conn.put_file(Path(w.stdout), w.stdout) if w and w.stdout else 0)
        except WorkloadLost as e:
            print(json.dumps({"lost": str(e), "id": j.id}))
            return 13
        except MigrdError as e:
            # Before the switch: the source was left stopped; it runs on.
            workloads.resume(pid, info.start_time)
            j.record("rolled_back", reason=str(e))
            print(json.dumps({"rolled_back": str(e), "id": j.id}))
            return 1
    if w:
        workloads.Registry(cfg.state_dir).remove(w.name)
    j.record("done", outcome="ok")
    print(json.dumps({"id": j.id, **dataclasses.asdict(moved)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
