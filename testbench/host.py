"""Host-side helpers: commands, processes, mounts, cgroups and directory removal.

Every function acts only on the PIDs, paths and cgroups its caller names, so
the bench never touches processes or mounts it did not create.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

# cgroup v1 named hierarchy and the cgroup2 mount of a hybrid host. A process
# must be moved into its own cgroup in both before it starts systemd-nspawn.
CGROUP_HIERARCHIES = (Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup/unified"))


class BenchError(RuntimeError):
    """A bench operation failed on the host or inside a node."""


def run(
    cmd: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 120,
    input: str | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run a host command with text output captured.

    Raises BenchError with the command's stderr if it exits non-zero and
    `check` is true, or if it times out.
    """
    try:
        result = subprocess.run(
            list(cmd),
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired as error:
        raise BenchError(f"command timed out after {timeout} s: {' '.join(cmd)}") from error
    if check and result.returncode != 0:
        raise BenchError(
            f"command failed with exit code {result.returncode}: {' '.join(cmd)}\n"
            f"{result.stderr.strip()}"
        )
    return result


# --- processes ---------------------------------------------------------------


def _read_stat_fields(pid: int) -> list[str] | None:
    """Return the /proc/PID/stat fields after the command name, or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may contain spaces and parentheses, so split after the last ")".
    return text[text.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Return the start time of a live process in clock ticks since boot.

    Returns None if the process does not exist or is a zombie. The pair
    (PID, start time) identifies a process even after its PID is reused.
    """
    fields = _read_stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Return whether the process lives and, if given, still has `start_time`."""
    current = process_start_time(pid)
    if current is None:
        return False
    return start_time is None or current == start_time


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def child_pids(pid: int) -> list[int]:
    """Return the PIDs of the live direct children of `pid`."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _read_stat_fields(int(entry.name))
        if fields is not None and int(fields[1]) == pid and fields[0] not in ("Z", "X"):
            children.append(int(entry.name))
    return sorted(children)


def reap(pid: int) -> None:
    """Collect the exit status if `pid` is an exited child of this process."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def wait_process_exit(pid: int, start_time: int | None, timeout: float) -> bool:
    """Wait until the process exits. Return False if it still runs after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        reap(pid)
        if not process_alive(pid, start_time):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)


def signal_process(pid: int, start_time: int | None, sig: int) -> None:
    """Send `sig` to the process unless it exited or its PID now names another process."""
    if not process_alive(pid, start_time):
        return
    log.info("sending %s to PID %d", signal.Signals(sig).name, pid)
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- mounts and directories ---------------------------------------------------


def _unescape_mount_path(field: str) -> str:
    """Decode the octal escapes (\\040 for space and so on) of /proc/self/mountinfo."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def mounts_under(path: Path) -> list[Path]:
    """Return the mount points at or below `path`, deepest first."""
    root = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            mount_point = _unescape_mount_path(line.split()[4])
            if mount_point == root or mount_point.startswith(root + "/"):
                found.append(Path(mount_point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def unmount_tree(path: Path) -> None:
    """Unmount everything mounted at or below `path`.

    Falls back to a lazy unmount for a busy mount, so a mount left busy by a
    crashed run does not block cleanup. Raises BenchError if a mount point is
    still listed after that.
    """
    for mount_point in mounts_under(path):
        log.info("unmounting %s", mount_point)
        if run(["umount", str(mount_point)], check=False).returncode != 0:
            run(["umount", "--lazy", str(mount_point)], check=False)
    left = mounts_under(path)
    if left:
        raise BenchError(f"failed to unmount {', '.join(map(str, left))}")


def remove_tree(path: Path) -> None:
    """Unmount everything below `path`, then delete it.

    `rm --one-file-system` skips directories on other file systems and then
    fails, so a bind mount that survived the unmount is not emptied.
    """
    if not path.exists():
        return
    unmount_tree(path)
    run(["rm", "-rf", "--one-file-system", str(path)])


# --- cgroups ------------------------------------------------------------------


def remove_cgroup(name: str, timeout: float = 10) -> None:
    """Remove the cgroup `name` and its sub-cgroups from both hierarchies.

    A cgroup directory is removed with rmdir, bottom-up, and only once its
    processes have exited, so this retries until `timeout` s have passed.
    Raises BenchError if a directory remains.
    """
    deadline = time.monotonic() + timeout
    for hierarchy in CGROUP_HIERARCHIES:
        top = hierarchy / name
        while top.exists():
            directories = sorted(
                (p for p in top.rglob("*") if p.is_dir()),
                key=lambda p: len(p.parts),
                reverse=True,
            )
            try:
                for directory in [*directories, top]:
                    directory.rmdir()
            except FileNotFoundError:
                continue
            except OSError as error:
                if time.monotonic() >= deadline:
                    raise BenchError(f"failed to remove cgroup {top}: {error}") from error
                time.sleep(0.2)
