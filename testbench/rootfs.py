"""Build and cache the Debian root filesystem that every node overlays.

The base looks like a Chameleon image as far as the playbooks care: a user
`cc` with passwordless sudo, sshd enabled, and Python 3 for Ansible. It has an
empty /etc/machine-id and no SSH host keys, because the bench gives every node
its own before boot.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterable

from testbench.host import BenchError, remove_tree, run
from testbench.wheelhouse import NODE_WHEELHOUSE

log = logging.getLogger(__name__)

DEFAULT_MIRROR = "http://deb.debian.org/debian"

BASE_PACKAGES = (
    "ca-certificates",
    "dbus",
    "fuse3",
    "iproute2",
    "libpam-systemd",
    "openssh-server",
    "python3",
    # Ubuntu's cloud images, which Chameleon uses, ship python3-apt; Ansible's
    # apt module needs it to run in check mode.
    "python3-apt",
    "python3-venv",
    "sudo",
    "systemd",
    "systemd-sysv",
)

# CA certificates of the host's HTTPS proxy, which nodes need to reach PyPI.
HOST_CA_DIR = Path("/usr/local/share/ca-certificates")

# Bump when the customization below changes, so cached trees are rebuilt.
LAYOUT_VERSION = 4

STAMP_NAME = "complete.json"

# Background apt runs would take the dpkg lock while a playbook installs packages.
# A node has no console to ask for passwords on. NOTE: its ask-password path
# units once failed on a loaded host and left a trixie node degraded, cause unknown.
MASKED_UNITS = ("apt-daily.timer", "apt-daily-upgrade.timer",
                "systemd-ask-password-console.path", "systemd-ask-password-wall.path")


def build_rootfs(
    cache_dir: Path,
    suite: str = "bookworm",
    extra_packages: Iterable[str] = (),
    mirror: str = DEFAULT_MIRROR,
) -> Path:
    """Return a finished root filesystem for `suite` with the base and extra packages.

    A tree is reused when `cache_dir` contains one for the same suite, package
    set, mirror, host CA certificates and layout version. Otherwise it is built
    with mmdebstrap in a temporary directory, which is renamed into place only
    after its stamp file is written, so an interrupted build is never reused.
    Concurrent calls for the same tree wait on a lock file.
    """
    if isinstance(extra_packages, str):
        raise BenchError(f"extra_packages must be a list of package names, not the string {extra_packages!r}")
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    packages = sorted(set(BASE_PACKAGES) | set(extra_packages))
    key = _cache_key(suite, packages, mirror)
    entry = cache_dir / key

    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (entry / STAMP_NAME).is_file():
            return entry / "rootfs"
        # Leftovers of a crashed build: an unstamped entry or a temporary directory.
        remove_tree(entry)
        for stale in cache_dir.glob(f".build-{key}-*"):
            remove_tree(stale)

        started = time.monotonic()
        build_dir = Path(tempfile.mkdtemp(prefix=f".build-{key}-", dir=cache_dir))
        try:
            _run_mmdebstrap(build_dir, suite, packages, mirror)
            _customize(build_dir / "rootfs")
            stamp = {"suite": suite, "packages": packages, "mirror": mirror}
            (build_dir / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
            os.chmod(build_dir, 0o755)
            os.rename(build_dir, entry)
        except BaseException:
            remove_tree(build_dir)
            raise
        log.info("built %s root filesystem %s in %.0f s", suite, entry, time.monotonic() - started)
        return entry / "rootfs"


def _cache_key(suite: str, packages: list[str], mirror: str) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps([LAYOUT_VERSION, suite, packages, mirror]).encode())
    for cert in sorted(HOST_CA_DIR.glob("*.crt")):
        digest.update(cert.name.encode() + b"\0" + cert.read_bytes())
    return f"{suite}-{digest.hexdigest()[:16]}"


def _run_mmdebstrap(build_dir: Path, suite: str, packages: list[str], mirror: str) -> None:
    log.info("running mmdebstrap for %s into %s", suite, build_dir)
    log_path = build_dir / "mmdebstrap.log"
    cmd = [
        "mmdebstrap",
        "--variant=minbase",
        # Keep the package lists, as a cloud image has them: mmdebstrap would
        # empty them yet leave them looking fresh, so Ansible's apt module,
        # trusting its cache_valid_time, would find no package at all.
        "--skip=cleanup/apt/lists",
        f"--include={','.join(packages)}",
        suite,
        str(build_dir / "rootfs"),
        mirror,
    ]
    with open(log_path, "w") as log_file:
        try:
            result = subprocess.run(cmd, stdout=log_file, stderr=subprocess.STDOUT, timeout=1800)
        except subprocess.TimeoutExpired as error:
            raise BenchError(f"mmdebstrap timed out after 1800 s; see {log_path}") from error
    if result.returncode != 0:
        tail = log_path.read_text()[-3000:]
        raise BenchError(
            f"mmdebstrap failed for suite {suite} with exit code {result.returncode}:\n{tail}"
        )


def _customize(rootfs: Path) -> None:
    """Turn the fresh mmdebstrap tree into the template that every node overlays."""
    # An empty machine-id marks an image without identity. The bench writes one per node.
    (rootfs / "etc/machine-id").write_text("")
    dbus_machine_id = rootfs / "var/lib/dbus/machine-id"
    if dbus_machine_id.exists() or dbus_machine_id.is_symlink():
        dbus_machine_id.unlink()
    dbus_machine_id.parent.mkdir(parents=True, exist_ok=True)
    dbus_machine_id.symlink_to("/etc/machine-id")

    # Host keys are generated per node, so no two nodes share an identity.
    for host_key in (rootfs / "etc/ssh").glob("ssh_host_*"):
        host_key.unlink()

    local_ca_dir = rootfs / "usr/local/share/ca-certificates"
    local_ca_dir.mkdir(parents=True, exist_ok=True)
    for cert in HOST_CA_DIR.glob("*.crt"):
        shutil.copy2(cert, local_ca_dir / cert.name)
    run(["chroot", str(rootfs), "update-ca-certificates"])

    run(["chroot", str(rootfs), "useradd", "--create-home", "--shell", "/bin/bash",
         "--groups", "sudo", "cc"])
    ssh_dir = rootfs / "home/cc/.ssh"
    ssh_dir.mkdir(mode=0o700)
    (ssh_dir / "authorized_keys").touch(mode=0o600)
    run(["chroot", str(rootfs), "chown", "-R", "cc:cc", "/home/cc/.ssh"])
    sudoers = rootfs / "etc/sudoers.d/cc"
    sudoers.write_text("cc ALL=(ALL) NOPASSWD:ALL\n")
    sudoers.chmod(0o440)
    run(["chroot", str(rootfs), "visudo", "--check", "--file=/etc/sudoers.d/cc"])

    # pip on the node prefers the bench's wheelhouse (testbench/wheelhouse.py)
    # for versions it offers, and uses the index for everything else.
    (rootfs / "etc/pip.conf").write_text(f"[global]\nfind-links = {NODE_WHEELHOUSE}\n")

    run(["chroot", str(rootfs), "systemctl", "enable", "systemd-networkd.service", "ssh.service"])
    run(["chroot", str(rootfs), "systemctl", "mask", *MASKED_UNITS])
