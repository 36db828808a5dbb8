"""`migrctl peer ...`: the target-side steps of a migration, run by the source over SSH.

Kept apart from the rest of the CLI so that each remote step imports only what it needs (no
paramiko): every call is one SSH session plus one Python start on the target.
"""

from __future__ import annotations

import json
import select
import sys
from typing import Any

import click

from migrd.adapters import untrusted
from migrd.engine import target as peer_mod
from migrd.errors import InputError
from migrd.engine.receive import COMPRESSIONS
from migrd.cli.common import json_option, load_config


@click.group(hidden=True)
def peer() -> None:
    """Target-side steps of a migration (run by the source over SSH)."""


def _stdin_json(origin: str) -> Any:
    """The source's JSON on stdin; InputError (one line naming origin) for junk or deep nesting."""
    return untrusted.loads(sys.stdin.read() or "{}", InputError, origin)


@peer.command("precheck")
@json_option
def peer_precheck(as_json: bool) -> None:
    click.echo(json.dumps(peer_mod.run_precheck(load_config(), _stdin_json("precheck request"))))


@peer.command("restore")
@click.argument("mid")
@click.option("--name")
@click.option("--stdout")
@click.option("--address")
@click.option("--await-commit", is_flag=True,
              help="After the restore, wait for 'commit' or 'abort' on stdin (saves the source a "
                   "second SSH session while the process is frozen).")
@click.option("--await-go", is_flag=True,
              help='Print {"ready": true} once started, then restore only after one line on stdin '
                   '({"page_bytes": N} when the pages were streamed by `peer pages`, else null); EOF '
                   "ends without restoring. The source opens this "
                   "session before it freezes the process, so SSH and Python start-up are not downtime.")
@json_option
def peer_restore(mid: str, name: str | None, stdout: str | None, address: str | None,
                 await_commit: bool, await_go: bool, as_json: bool) -> None:
    cfg = load_config()
    page_bytes = None
    if await_go:
        click.echo(json.dumps({"ready": True}))
        sys.stdout.flush()
        line = sys.stdin.readline()
        if not line:
            return  # the source gave up before the restore: nothing was done here
        page_bytes = peer_mod.parse_go(line).page_bytes
    click.echo(json.dumps(peer_mod.restore(cfg, mid, name, stdout, address, page_bytes)))
    if not await_commit:
        return
    sys.stdout.flush()
    # EOF or silence: the source died or gave up. The copy stays stopped; the source's
    # rollback or `migrd recover` decides its fate with `peer abort` or `peer finish`.
    ready, _, _ = select.select([sys.stdin], [], [], cfg.ssh.op_timeout)
    word = sys.stdin.readline().strip() if ready else ""
    if word == "commit":
        click.echo(json.dumps(peer_mod.finish(cfg, mid, address)))
    elif word == "abort":
        click.echo(json.dumps(peer_mod.abort(cfg, mid, address, [])))


@peer.command("pages")
@click.argument("mid")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True)
def peer_pages(mid: str, compression: str) -> None:
    """Serve a dump's pages: the page stream on stdin, the page server's answers on stdout."""
    peer_mod.pages(load_config(), mid, compression)


@peer.command("precopy")
@click.argument("mid")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True)
def peer_precopy(mid: str, compression: str) -> None:
    """Pre-copy's target side: pages by content on stdin while the workload runs there, then
    the dump's page images as pages and digests; rebuilds them for `peer restore`."""
    peer_mod.precopy(load_config(), mid, compression)


@peer.command("lazy")
@click.argument("mid")
@click.option("--name")
@click.option("--stdout")
@click.option("--address")
@click.option("--compression", type=click.Choice(COMPRESSIONS), default="none", show_default=True)
def peer_lazy(mid: str, name: str | None, stdout: str | None, address: str | None, compression: str) -> None:
    """Post-copy's target side: images, then lazy pages and control, framed on stdin/stdout."""
    from migrd.engine import lazy

    peer_mod.lazy(load_config(), mid, name, stdout, address, lazy.fd_link(compression=compression))


@peer.command("files")
@json_option
def peer_files(as_json: bool) -> None:
    """Receive the files a migration carries: ready at once, then headers and bytes on stdin
    until EOF (started before the freeze, like `peer restore --await-go`)."""
    click.echo(json.dumps({"ready": True}))
    sys.stdout.flush()
    click.echo(json.dumps({"files": peer_mod.receive_files(0)}))


@peer.command("start")
@click.argument("mid")
@json_option
def peer_start(mid: str, as_json: bool) -> None:
    click.echo(json.dumps(peer_mod.start(load_config(), mid, _stdin_json("start request"))))


@peer.command("status")
@click.argument("mid")
@json_option
def peer_status(mid: str, as_json: bool) -> None:
    click.echo(json.dumps(peer_mod.status(load_config(), mid)))


@peer.command("abort")
@click.argument("mid")
@click.option("--address")
@click.option("--file", "files", multiple=True)
@json_option
def peer_abort(mid: str, address: str | None, files: tuple[str, ...], as_json: bool) -> None:
    click.echo(json.dumps(peer_mod.abort(load_config(), mid, address, list(files))))


@peer.command("finish")
@click.argument("mid")
@click.option("--address")
@json_option
def peer_finish(mid: str, address: str | None, as_json: bool) -> None:
    click.echo(json.dumps(peer_mod.finish(load_config(), mid, address)))


# The agent's side of fill mode: an idle peer asks this host for work.
from migrd.cli.agent import offer

peer.add_command(offer)
