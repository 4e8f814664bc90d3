"""Per-node root filesystem: an overlay on the shared rootfs plus the node's identity.

Everything a node must not share with its siblings (machine-id, hostname,
address, SSH host keys, the bench's SSH key for `cc`) is written into the
overlay's upper directory before the node boots.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from testbench.host import BenchError, run


def mount_overlay(rootfs: Path, node_dir: Path) -> Path:
    """Mount an overlay of `rootfs` with its upper layer in `node_dir`. Return the merged dir."""
    upper = node_dir / "upper"
    work = node_dir / "work"
    merged = node_dir / "merged"
    for directory in (upper, work, merged):
        directory.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={rootfs},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", "overlay", "-o", options, str(merged)])
    return merged


def write_identity(
    merged: Path,
    hostname: str,
    address: str,
    prefix_length: int,
    gateway: str,
    authorized_key: str,
) -> None:
    """Give the node its hostname, machine-id, static address and SSH keys."""
    (merged / "etc/hostname").write_text(f"{hostname}\n")
    (merged / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n"
        f"127.0.1.1\t{hostname}\n"
        "::1\tlocalhost ip6-localhost ip6-loopback\n"
    )
    # A fixed machine-id, unlike an empty one, survives reboots without a commit step.
    (merged / "etc/machine-id").write_text(f"{uuid.uuid4().hex}\n")

    network_dir = merged / "etc/systemd/network"
    network_dir.mkdir(parents=True, exist_ok=True)
    # nspawn names the container end of the --network-bridge veth pair "host0".
    (network_dir / "10-host0.network").write_text(
        "[Match]\n"
        "Name=host0\n"
        "\n"
        "[Network]\n"
        f"Address={address}/{prefix_length}\n"
        f"Gateway={gateway}\n"
        "LinkLocalAddressing=no\n"
        "IPv6AcceptRA=no\n"
    )

    run(["ssh-keygen", "-A", "-f", str(merged)])
    _install_authorized_key(merged, "cc", authorized_key)


def _install_authorized_key(merged: Path, user: str, public_key: str) -> None:
    uid, gid, home = _lookup_user(merged, user)
    ssh_dir = merged / home.lstrip("/") / ".ssh"
    ssh_dir.mkdir(mode=0o700, exist_ok=True)
    os.chown(ssh_dir, uid, gid)
    keys = ssh_dir / "authorized_keys"
    keys.write_text(public_key.strip() + "\n")
    os.chown(keys, uid, gid)
    keys.chmod(0o600)


def _lookup_user(merged: Path, user: str) -> tuple[int, int, str]:
    """Return (uid, gid, home) of `user` from the node's /etc/passwd, not the host's."""
    for line in (merged / "etc/passwd").read_text().splitlines():
        fields = line.split(":")
        if fields[0] == user:
            return int(fields[2]), int(fields[3]), fields[5]
    raise BenchError(f"user {user} not found in {merged}/etc/passwd; rebuild the rootfs")
