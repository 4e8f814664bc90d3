"""Apply-level faults: interrupted apply, two runs at once, failed import, nearly full disk.

The tests share one node and run in file order: each starts from the state
that the one before left. Interruption points are taken from the progress
lines, so a signal lands while a given task runs on the node.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from testbench.compare import viewer_differences
from testbench.faults import end_outage, start_outage
from testbench.store import add_run_to_published_store, publish_sample_store
from tests.conftest import PROJECT_ROOT, S3_NETNS, S3_PORT, RunnerResult, make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("fapply", node_address(57))
VIEWER_URL = f"http://{NODE[1]}:8000"
# Buckets of their own: this module adds runs to its store.
METRICS_BUCKET = "faults-apply-mlruns"
ARTIFACTS_BUCKET = "faults-apply-artifacts"
STATE_DIR = "/var/lib/mlflow-replay/demo"
SNAPSHOT = f"{STATE_DIR}/snapshot.db"
INSTALL_MLFLOW_TASK = "TASK Install MLflow 3.17.2"
IMPORT_TASK = "TASK Import the store when it changed since the last import"
EXIT_LOCKED = 5
EXIT_INTERRUPTED = 130
# Seconds after a task's progress line before the signal, so that its module runs on the node.
SIGNAL_DELAY = 5
# Waits, not timings: a run that takes longer than this has hung.
RUN_TIMEOUT = 900


class BackgroundRun:
    """`runner.py` started in the background, with its output lines collected as they arrive."""

    def __init__(self, replay, *arguments: str):
        environment = dict(os.environ)
        environment.pop("AWS_CA_BUNDLE", None)
        environment["AWS_ACCESS_KEY_ID"] = replay.s3.access_key
        environment["AWS_SECRET_ACCESS_KEY"] = replay.s3.secret_key
        command, *rest = arguments
        self.started = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, str(PROJECT_ROOT / "runner.py"), command,
             "--inventory", str(replay.inventory), "--vars", str(replay.vars_file), *rest],
            cwd=PROJECT_ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float = RUN_TIMEOUT) -> None:
        """Wait until an output line starts with `text`; fail if the run ends or times out first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(line.startswith(text) for line in self.lines):
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line {text!r} after {timeout} s:\n" + "\n".join(self.lines[-40:])
                assert self.process.poll() is None or self._reader.is_alive(), (
                    f"the run ended before {text!r}:\n" + "\n".join(self.lines[-40:]))
                self._changed.wait(min(remaining, 1))

    def signal(self, number: int) -> None:
        os.kill(self.process.pid, number)

    def finish(self, timeout: float = RUN_TIMEOUT) -> RunnerResult:
        self.process.wait(timeout)
        self._reader.join(10)
        output = "\n".join(self.lines)
        print(output)
        return RunnerResult(self.process.returncode, output)


def playbook_processes(inventory: Path) -> list[int]:
    """Return the PIDs of the ansible-playbook processes running against `inventory`."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if any(word.endswith(b"ansible-playbook") for word in words) and str(inventory).encode() in words:
            pids.append(int(entry.name))
    return pids


def run_after_orphan(replay, *arguments: str, timeout: float = 300) -> tuple[RunnerResult, int]:
    """Run runner.py, again while it is rejected because a killed run's ansible-playbook still runs.

    Returns the last result and the number of rejections.
    """
    rejections = 0
    deadline = time.monotonic() + timeout
    while True:
        result = replay.runner(*arguments)
        if result.returncode != EXIT_LOCKED:
            return result, rejections
        assert "still runs" in result.output, result.output
        assert time.monotonic() < deadline, "the killed run's ansible-playbook did not stop"
        rejections += 1
        time.sleep(5)


def interrupt_apply(replay, task_line: str, number: int) -> RunnerResult:
    """Start apply and send signal `number` SIGNAL_DELAY seconds after `task_line` appears."""
    run = BackgroundRun(replay, "apply")
    run.wait_for_line(task_line)
    time.sleep(SIGNAL_DELAY)
    signalled = time.monotonic()
    run.signal(number)
    result = run.finish()
    timing(f"runner.py exit after {signal.Signals(number).name}", time.monotonic() - signalled)
    return result


def timing(name: str, seconds: float) -> None:
    """Print one measured duration; the report in docs/reliability.md collects them."""
    print(f"TIMING {name}: {seconds:.1f} s")


def snapshot_digest(node) -> str:
    return node.run(f"sha256sum {SNAPSHOT}").stdout.split()[0]


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("faults-apply-store")


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, store_dir):
    manifest = publish_sample_store(s3, METRICS_BUCKET, ARTIFACTS_BUCKET, store_dir)
    replay = make_replay(tmp_path_factory.mktemp("faults-apply"), bench, [node], s3,
                         metrics_container=METRICS_BUCKET, artifacts_container=ARTIFACTS_BUCKET)
    replay.manifest = manifest
    yield replay
    replay.runner("teardown")


def test_sigint_during_mlflow_install(replay, node):
    result = interrupt_apply(replay, INSTALL_MLFLOW_TASK, signal.SIGINT)

    assert result.returncode == EXIT_INTERRUPTED, result.output
    assert f"These hosts may be half-applied: {node.name}" in result.output
    assert "Run 'runner.py apply' again" in result.output
    assert "'runner.py teardown'" in result.output
    assert playbook_processes(replay.inventory) == []


def test_apply_after_sigkill_during_mlflow_install(replay, node):
    killed = interrupt_apply(replay, INSTALL_MLFLOW_TASK, signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL

    started = time.monotonic()
    repair, rejections = run_after_orphan(replay, "apply")
    timing("apply after SIGKILL during MLflow install", time.monotonic() - started)
    print(f"apply rejected {rejections} time(s) while the killed run's ansible-playbook ran")

    assert repair.returncode == 0, repair.output
    assert viewer_differences(VIEWER_URL, replay.manifest) == []
    assert replay.runner("apply").recap(node.name)["changed"] == 0


def test_second_apply_rejected_while_first_runs(replay, node):
    first = BackgroundRun(replay, "apply")
    first.wait_for_line("TASK ")

    started = time.monotonic()
    second = replay.runner("apply")
    timing("second apply rejected", time.monotonic() - started)
    teardown = replay.runner("teardown")
    result = first.finish()

    assert second.returncode == EXIT_LOCKED, second.output
    assert f"PID {first.process.pid}" in second.output
    assert f"runner.py apply --inventory {replay.inventory}" in second.output
    assert "started 20" in second.output
    assert "TASK " not in second.output
    assert teardown.returncode == EXIT_LOCKED, teardown.output
    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0


def test_failed_import_keeps_previous_snapshot(replay, node, s3, store_dir):
    before = snapshot_digest(node)
    grown = add_run_to_published_store(s3, store_dir, run_name="added-during-outage")
    frozen = {}

    def freeze_sync_then_cut_endpoint():
        # Stop rclone as soon as its sync starts, cut the endpoint, then let
        # it go on: the copy fails part way, after a successful listing.
        found = node.run("for i in $(seq 1 3000); do p=$(pgrep -f ' [s]ync --transfers') && "
                         "{ kill -STOP $p; echo $p; exit 0; }; sleep 0.05; done; exit 1", timeout=400)
        start_outage(S3_NETNS, S3_PORT, "reject")
        frozen["pid"] = found.stdout.split()[0]
        node.run(f"kill -CONT {frozen['pid']}")

    freezer = threading.Thread(target=freeze_sync_then_cut_endpoint)
    try:
        run = BackgroundRun(replay, "apply")
        freezer.start()
        failed = run.finish()
        freezer.join(60)
    finally:
        end_outage(S3_NETNS, S3_PORT, "reject")
    timing("apply with an endpoint outage during the copy", time.monotonic() - run.started)

    assert frozen, "rclone sync never started"
    assert failed.returncode == 1, failed.output
    message = [line for line in failed.output.splitlines() if "previous snapshot keeps serving" in line]
    assert message and "copying store:" in message[0], failed.output
    assert snapshot_digest(node) == before
    assert viewer_differences(VIEWER_URL, replay.manifest) == []

    started = time.monotonic()
    retry = replay.runner("apply")
    timing("apply after failed import", time.monotonic() - started)
    assert retry.returncode == 0, retry.output
    assert IMPORT_TASK[len("TASK "):] in retry.changed_tasks(node.name)
    assert viewer_differences(VIEWER_URL, grown) == []
    assert replay.runner("apply").recap(node.name)["changed"] == 0
    replay.manifest = grown


def test_full_disk_rejects_import(replay, node, s3, store_dir):
    # A 48 MiB tmpfs over the state directory, with its files copied in, stands
    # for the node's disk; the filler leaves 4 MiB free.
    node.run(f"cp -a {STATE_DIR} /root/state-copy && mount -t tmpfs -o size=48m,mode=0755 tmpfs {STATE_DIR} "
             f"&& cp -a /root/state-copy/. {STATE_DIR}/ && rm -rf /root/state-copy")
    try:
        check_full_disk_rejects_import(replay, node, s3, store_dir)
    finally:
        # The server may hold the database on the tmpfs open: detach it lazily.
        node.run(f"umount -l {STATE_DIR}", check=False)


def check_full_disk_rejects_import(replay, node, s3, store_dir):
    free_kib = int(node.run(f"df --output=avail -k {STATE_DIR} | tail -1").stdout)
    node.run(f"fallocate -l {(free_kib - 4096) * 1024} {STATE_DIR}/filler")
    before = snapshot_digest(node)
    grown = add_run_to_published_store(s3, store_dir, run_name="added-on-full-disk")

    rejected = replay.runner("apply")

    assert rejected.returncode == 1, rejected.output
    message = [line for line in rejected.output.splitlines() if "not enough free space" in line]
    assert message, rejected.output
    assert "the import needs " in message[0]
    assert " MiB is free" in message[0]
    assert snapshot_digest(node) == before
    assert viewer_differences(VIEWER_URL, replay.manifest) == []

    node.run(f"rm {STATE_DIR}/filler")
    started = time.monotonic()
    retry = replay.runner("apply")
    timing("apply after freeing space", time.monotonic() - started)
    assert retry.returncode == 0, retry.output
    assert viewer_differences(VIEWER_URL, grown) == []
    assert replay.runner("apply").recap(node.name)["changed"] == 0
    used = node.run(f"du -sk {STATE_DIR}/mirror {SNAPSHOT}").stdout
    print(f"state directory use (KiB):\n{used}")
    replay.manifest = grown


def test_teardown_after_sigkill_during_import(replay, node, s3, store_dir):
    add_run_to_published_store(s3, store_dir, run_name="added-before-kill")
    run = BackgroundRun(replay, "apply")
    run.wait_for_line(IMPORT_TASK)
    # Short, because the import of one added run takes seconds.
    time.sleep(2)
    run.signal(signal.SIGKILL)
    killed = run.finish()
    importing = node.run("pgrep -f 'import-[s]napshot'", check=False).returncode == 0

    started = time.monotonic()
    teardown, rejections = run_after_orphan(replay, "teardown")
    timing("teardown after SIGKILL during import", time.monotonic() - started)
    print(f"teardown rejected {rejections} time(s) while the killed run's ansible-playbook ran")

    assert killed.returncode == -signal.SIGKILL
    assert importing, "the import had ended before the kill: the case was not exercised"
    assert teardown.returncode == 0, teardown.output
    assert node.run("pgrep -f 'import-[s]napshot'", check=False).returncode != 0
    assert node.run("test -e /var/lib/mlflow-replay", check=False).returncode != 0
    assert node.run("ls /etc/systemd/system/mlflow-replay-*", check=False).returncode != 0
