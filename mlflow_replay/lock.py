"""One apply or teardown at a time per inventory, with an flock lock on the control host."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import time
from pathlib import Path


def lock_directory() -> Path:
    """Return $XDG_STATE_HOME/mlflow-replay/locks, by default under ~/.local/state."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "mlflow-replay" / "locks"


def lock_path(inventory: Path, directory: Path | None = None) -> Path:
    """Return the lock file of `inventory`: one per resolved inventory path."""
    digest = hashlib.sha256(str(inventory.resolve()).encode()).hexdigest()[:16]
    return (directory or lock_directory()) / f"inventory-{digest}.lock"


class LockHeldError(Exception):
    """Another run has the lock of the inventory. `holder` is its record, or {} when unreadable."""

    def __init__(self, path: Path, holder: dict):
        self.path = path
        self.holder = holder
        super().__init__(self.describe())

    def describe(self) -> str:
        holder = self.holder
        started = holder.get("started")
        started_text = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if started else "unknown"
        run = (f"PID {holder.get('pid', 'unknown')}, command '{holder.get('command', 'unknown')}', "
               f"started {started_text}")
        if holder.get("orphan"):
            return (
                f"the ansible-playbook process (PID {holder.get('ansible_playbook_pid')}) of a run that was "
                f"killed ({run}) still runs against {holder.get('inventory', 'this inventory')}. It stops "
                "after its current task; wait for it, then run this command again "
                f"(lock file {self.path})."
            )
        return (
            f"another run against {holder.get('inventory', 'this inventory')} is in progress: {run}. "
            f"Wait for it to finish, or stop it, then run this command again (lock file {self.path})."
        )


class InventoryLock:
    """An exclusive, non-blocking flock on the lock file of one inventory.

    Contract:
    - `acquire` either takes the lock at once or raises LockHeldError with the
      holder's PID, command line and start time, read from the lock file.
    - The kernel releases an flock lock when its last file descriptor closes,
      including when the holder is killed with SIGKILL, so a crashed run never
      blocks the next one. The file stays on disk; only the lock matters.
    - The descriptor is not inheritable (Python's default), so the lock ends
      with this process. ansible-playbook outlives a runner killed with
      SIGKILL until its current task ends, because ansible-runner starts it
      with SIGHUP ignored. `record_child` therefore stores its PID and start
      time, and `acquire` also raises LockHeldError while that process lives.
    """

    def __init__(self, inventory: Path, command: str, directory: Path | None = None):
        self.inventory = inventory.resolve()
        self.command = command
        self.path = lock_path(self.inventory, directory)
        self._descriptor: int | None = None
        self._record: dict = {}

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(descriptor)
            os.close(descriptor)
            raise LockHeldError(self.path, holder) from None
        previous = _read_record(descriptor)
        if _process_alive(previous.get("ansible_playbook_pid"), previous.get("ansible_playbook_start")):
            os.close(descriptor)
            raise LockHeldError(self.path, {**previous, "orphan": True})
        self._descriptor = descriptor
        self._record = {"pid": os.getpid(), "command": self.command, "started": time.time(),
                        "inventory": str(self.inventory)}
        self._write_record()

    def record_child(self, pid: int) -> None:
        """Store the PID and start time of this run's ansible-playbook in the lock file."""
        if self._descriptor is None:
            return
        self._record.update(ansible_playbook_pid=pid, ansible_playbook_start=process_start_time(pid))
        self._write_record()

    def _write_record(self) -> None:
        os.ftruncate(self._descriptor, 0)
        os.pwrite(self._descriptor, (json.dumps(self._record) + "\n").encode(), 0)

    def release(self) -> None:
        if self._descriptor is not None:
            # Empty the record first, so that no later run reads a finished run as
            # the holder. A run killed with SIGKILL keeps its record, which is
            # how the next run finds an ansible-playbook that outlived it.
            os.ftruncate(self._descriptor, 0)
            os.close(self._descriptor)
            self._descriptor = None

    def __enter__(self) -> InventoryLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _read_record(descriptor: int) -> dict:
    """Return the holder record in the lock file, or {} while the holder is still writing it."""
    try:
        return json.loads(os.pread(descriptor, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def process_start_time(pid: int) -> int | None:
    """Return the start time of `pid` in clock ticks since boot (/proc/PID/stat), or None if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name, in brackets, may contain spaces: split after it.
    return int(stat.rsplit(")", 1)[1].split()[19])


def _process_alive(pid, start) -> bool:
    """Return whether `pid` still runs and is the process that started at `start` (not a reused PID)."""
    if not isinstance(pid, int) or start is None:
        return False
    return process_start_time(pid) == start


def command_line(argv: list[str] | None = None) -> str:
    """Return this process's command line as the lock record shows it."""
    words = sys.argv if argv is None else argv
    return " ".join(words)
