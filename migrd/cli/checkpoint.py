"""`migrctl check`, `checkpoint` and `restore`: single-host CRIU operations."""

from __future__ import annotations

from pathlib import Path

import click

from migrd.engine import checkpoint as cp
from migrd.adapters.criu import FEATURES, find_criu
from migrd.adapters.procfs import parse_pid
from migrd.cli.common import emit, human_bytes, json_option, load_config, require_root


@click.command()
@json_option
def check(as_json: bool) -> None:
    """Show which CRIU migrd uses and what this kernel lets it do.

    Exits 0 when `criu check` passes, 5 when it does not.
    """
    require_root("migrctl check")
    report = find_criu(load_config()).report()

    def human(r) -> str:
        lines = [f"criu:     {r.path}", f"version:  {r.version}",
                 f"check:    {'ok' if r.ok else 'FAILED'} ({r.message})", "features:"]
        lines += [f"  {'yes' if r.features[f] else 'no ':3}  {f:22} {FEATURES[f]}" for f in FEATURES]
        lines.append(f"post-copy: {'ready' if r.postcopy_unready is None else 'not ready: ' + r.postcopy_unready}")
        lines.append(f"kernel probe cache: {'kept' if r.probe_cache_unready is None else 'not kept: ' + r.probe_cache_unready}")
        return "\n".join(lines)

    emit(report, as_json, human)
    if not report.ok:
        raise SystemExit(5)


@click.command()
@click.argument("pid")
@click.option("--images", "-D", type=click.Path(path_type=Path), required=True,
              help="Directory to write the checkpoint to (created; must be empty if it exists).")
@click.option("--leave-running", is_flag=True, help="Keep the process running after the dump (a copy, not a move).")
@click.option("--tcp-established", is_flag=True, help="Also checkpoint established TCP connections.")
@json_option
def checkpoint(pid: str, images: Path, leave_running: bool, tcp_established: bool, as_json: bool) -> None:
    """Checkpoint process PID (and its children) into DIR with CRIU.

    Without --leave-running the process stops existing here once the dump succeeds: restore it
    with `migrctl restore DIR`. If the dump fails, the process keeps running and DIR is left
    empty. DIR gets a manifest.json listing every image file with its sha256.
    """
    require_root("migrctl checkpoint")
    result = cp.checkpoint(load_config(), parse_pid(pid), images.absolute(),
                           leave_running=leave_running, tcp_established=tcp_established)
    m = result.manifest
    summary = {"pid": m.process.pid, "images": str(result.images), "image_bytes": m.image_bytes,
               "files": len(m.files), "dump_seconds": round(result.dump_seconds, 3),
               "left_running": leave_running, "log": str(result.log)}
    emit(summary, as_json, lambda s: (
        f"checkpointed PID {s['pid']} into {s['images']}: {s['files']} files, "
        f"{human_bytes(s['image_bytes'])}, dump took {s['dump_seconds']:.2f} s"
        + (" (process left running)" if leave_running else "")))


@click.command()
@click.argument("images", type=click.Path(path_type=Path))
@json_option
def restore(images: Path, as_json: bool) -> None:
    """Restore the checkpoint in IMAGES, detached, and print the restored PID.

    The manifest is verified first: a missing, extra or altered file refuses the restore and
    starts nothing. A plain process gets its old PID back; if that PID is still taken, restore
    waits up to 15 s, then names the process holding it.
    """
    require_root("migrctl restore")
    r = cp.restore(load_config(), images.absolute())
    emit({"pid": r.pid, "restore_seconds": round(r.seconds, 3), "log": str(r.log)}, as_json,
         lambda s: f"restored PID {s['pid']} in {s['restore_seconds']:.2f} s")
