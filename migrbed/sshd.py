"""Private OpenSSH servers for the embedded bed and for tests: generated host keys, key-only
root login, listening on one address, never touching the system's /etc/ssh."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from migrd.adapters import command
from migrd.errors import CommandError

SSHD = "/usr/sbin/sshd"  # sshd refuses to start unless exec'd by absolute path


@dataclass(frozen=True)
class SshdFiles:
    config: Path
    host_key: Path
    authorized_keys: Path
    pid_file: Path

    def host_public_key(self) -> str:
        """'ssh-ed25519 AAAA...' (without comment), for known_hosts lines."""
        kind, blob = self.host_key.with_suffix(".pub").read_text().split()[:2]
        return f"{kind} {blob}"


def ensure_keypair(path: Path, comment: str = "migrd") -> Path:
    """Create an ed25519 key pair at path (and path.pub) unless it exists; return path."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        command.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


def known_hosts_line(address: str, port: int, public_key: str) -> str:
    host = address if port == 22 else f"[{address}]:{port}"
    return f"{host} {public_key}"


def files_in(directory: Path) -> SshdFiles:
    """Where `prepare` puts an sshd's files in directory."""
    return SshdFiles(directory / "sshd_config", directory / "ssh_host_ed25519_key",
                     directory / "authorized_keys", directory / "sshd.pid")


def prepare(directory: Path, listen: str, port: int, client_public_keys: Sequence[str]) -> SshdFiles:
    """Write host key, authorized_keys and sshd_config into directory (idempotent)."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    files = files_in(directory)
    host_key = ensure_keypair(files.host_key, "migrd-host")
    auth = files.authorized_keys
    auth.write_text("".join(k.strip() + "\n" for k in client_public_keys))
    auth.chmod(0o600)
    files.config.write_text(
        "\n".join(
            [
                f"ListenAddress {listen}:{port}" if ":" not in listen else f"ListenAddress [{listen}]:{port}",
                f"HostKey {host_key}",
                f"PidFile {files.pid_file}",
                f"AuthorizedKeysFile {auth}",
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "UsePAM no",
                # Strict modes would reject our state directories' ownership on some hosts.
                "StrictModes no",
                "PrintMotd no",
                "UseDNS no",
                "MaxStartups 64:30:128",
                "MaxSessions 64",
                "Subsystem sftp internal-sftp",
                "LogLevel ERROR",
                "",
            ]
        )
    )
    return files


def start(files: SshdFiles, prefix: Sequence[str] = (), log_file: Path | None = None) -> subprocess.Popen[bytes]:
    """Start sshd in the foreground (-D) under prefix (e.g. an nsenter argv); it is the
    returned Popen's own process, so the caller can stop it by PID."""
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # privilege-separation directory
    command.run([SSHD, "-t", "-f", str(files.config)])  # config errors surface here, readably
    out = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        p = command.spawn([*prefix, SSHD, "-D", "-e", "-f", str(files.config)], stdout=out, stderr=out)
    finally:
        if log_file:
            out.close()  # type: ignore[union-attr]
    try:
        p.wait(timeout=0.2)
    except subprocess.TimeoutExpired:
        return p
    raise CommandError(f"sshd exited at once (code {p.returncode}); see {log_file or 'its stderr'}")
