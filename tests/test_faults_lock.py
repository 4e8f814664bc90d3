"""The inventory lock: one apply or teardown at a time, and no stale lock after a crash."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from mlflow_replay.lock import InventoryLock, LockHeldError, lock_path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def inventory(tmp_path) -> Path:
    path = tmp_path / "inventory.ini"
    path.write_text("[replay_nodes]\n")
    return path


def hold_lock_in_child(inventory: Path, directory: Path) -> subprocess.Popen:
    """Start a Python process that takes the lock, prints 'locked' and sleeps."""
    code = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from mlflow_replay.lock import InventoryLock
        lock = InventoryLock(Path({str(inventory)!r}), "runner.py apply", Path({str(directory)!r}))
        lock.acquire()
        print("locked", flush=True)
        time.sleep(600)
    """)
    child = subprocess.Popen([sys.executable, "-c", code], cwd=PROJECT_ROOT, stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "locked"
    return child


def test_second_lock_rejected_with_holder(inventory, tmp_path):
    child = hold_lock_in_child(inventory, tmp_path / "locks")
    try:
        with pytest.raises(LockHeldError) as raised:
            InventoryLock(inventory, "runner.py teardown", tmp_path / "locks").acquire()
    finally:
        child.kill()
        child.wait()

    message = str(raised.value)
    assert f"PID {child.pid}" in message
    assert "command 'runner.py apply'" in message
    assert time.strftime("%Y-%m-%d", time.gmtime()) in message


def test_lock_free_after_sigkill(inventory, tmp_path):
    child = hold_lock_in_child(inventory, tmp_path / "locks")
    os.kill(child.pid, signal.SIGKILL)
    child.wait()

    with InventoryLock(inventory, "runner.py apply", tmp_path / "locks"):
        pass


def test_lock_free_after_release(inventory, tmp_path):
    with InventoryLock(inventory, "runner.py apply", tmp_path / "locks"):
        pass

    with InventoryLock(inventory, "runner.py apply", tmp_path / "locks"):
        pass


def test_other_inventory_not_blocked(inventory, tmp_path):
    other = tmp_path / "other.ini"
    other.write_text("[replay_nodes]\n")

    with InventoryLock(inventory, "runner.py apply", tmp_path / "locks"):
        with InventoryLock(other, "runner.py apply", tmp_path / "locks"):
            pass


def test_live_orphan_playbook_blocks(inventory, tmp_path):
    """A killed run's ansible-playbook that still runs keeps the inventory locked."""
    directory = tmp_path / "locks"
    orphan = subprocess.Popen(["sleep", "600"])
    try:
        crashed = InventoryLock(inventory, "runner.py apply", directory)
        crashed.acquire()
        crashed.record_child(orphan.pid)
        # A SIGKILL closes the descriptor without emptying the record.
        os.close(crashed._descriptor)

        with pytest.raises(LockHeldError) as raised:
            InventoryLock(inventory, "runner.py apply", directory).acquire()
        assert f"ansible-playbook process (PID {orphan.pid})" in str(raised.value)
    finally:
        orphan.kill()
        orphan.wait()

    with InventoryLock(inventory, "runner.py apply", directory):
        pass


def test_lock_file_private(inventory, tmp_path):
    with InventoryLock(inventory, "runner.py apply", tmp_path / "locks"):
        pass

    assert lock_path(inventory, tmp_path / "locks").stat().st_mode & 0o777 == 0o600
