"""`migrctl send` / `migrctl receive`: move a checkpoint directory to a peer over SSH. The
sender starts `migrctl receive` on the peer, which verifies every file before DIR appears."""

from __future__ import annotations

import json
from pathlib import Path

import click

from migrd.engine import receive as receiver


@click.command("receive")
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--manifest-sha256", required=True, metavar="HEX",
              help="sha256 of the manifest.json the sender streams; a different one is refused. "
                   "'-': read it from the first line of stdin (a sender that starts the receiver "
                   "before its checkpoint exists).")
@click.option("--compression", type=click.Choice(receiver.COMPRESSIONS), default="none", show_default=True)
def receive(directory: Path, manifest_sha256: str, compression: str) -> None:
    """Read a checkpoint image stream from stdin into DIRECTORY, verifying every file.

    DIRECTORY must not exist; it appears only when all files arrived intact."""
    if manifest_sha256 == "-":
        manifest_sha256 = receiver.read_line(0, 64).decode(errors="replace")
        if not manifest_sha256:
            return  # the sender gave up before its checkpoint existed: nothing to receive
    m = receiver.receive_fd(0, directory, manifest_sha256, compression)
    click.echo(json.dumps({"directory": str(directory), "files": len(m.files), "bytes": m.image_bytes}))


@click.command("send")
@click.argument("directory", type=click.Path(path_type=Path, exists=True, file_okay=False))
@click.argument("host")
@click.argument("remote_directory")
@click.option("--compression", type=click.Choice(receiver.COMPRESSIONS), default=None,
              help="Wire compression (default: ssh.compression from the config).")
@click.option("--json", "as_json", is_flag=True, help="Print the transfer figures as JSON (no progress bar).")
def send(directory: Path, host: str, remote_directory: str, compression: str | None, as_json: bool) -> None:
    """Copy checkpoint DIRECTORY to REMOTE_DIRECTORY on configured peer HOST."""
    # Imported here: `migrctl receive` runs on every transfer and must not pay for paramiko.
    from migrd import config
    from migrd.adapters import transport
    from migrd.cli.progress import Progress

    cfg = config.load()
    bar = Progress(f"{directory.name} -> {host}", enabled=False if as_json else None)
    try:
        with transport.connect(cfg, host) as conn:
            stats = conn.send_images(directory, remote_directory, progress=bar, compression=compression)
    finally:
        bar.close()
    figures = {"host": host, "directory": remote_directory, "bytes": stats.bytes, "wire_bytes": stats.wire_bytes,
               "seconds": round(stats.seconds, 3), "mb_s": round(stats.rate / 1e6, 1)}
    if as_json:
        click.echo(json.dumps(figures))
    else:
        click.echo(f"sent {stats.bytes / 2**20:.1f} MiB to {host}:{remote_directory} in {stats.seconds:.2f} s"
                   f" ({figures['mb_s']} MB/s, {stats.wire_bytes / 2**20:.1f} MiB on the wire)")
