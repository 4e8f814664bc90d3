"""Runtime faults on a native replay: MLflow killed, rclone killed, endpoint outage, reboot.

One node serves the sample store for the whole module. Each case injects a
fault while a background watch probes the viewer as an open UI does. It then
waits until the viewer serves the full store again without any `apply`, and
prints a `FAULT-TIMING` line with the recovery time for docs/reliability.md. The last case runs apply again and requires no change: the faults
left nothing for apply to repair.
"""

from __future__ import annotations

import os
import statistics
import time
import urllib.parse
import urllib.request

import pytest

from testbench.compare import viewer_differences
from testbench.faults import ViewerWatch, endpoint_outage, wait_for_full_viewer
from tests.conftest import S3_NETNS, S3_PORT, make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("fnative", node_address(55))
VIEWER_URL = f"http://{NODE[1]}:8000"
SERVER_UNIT = "mlflow-replay-demo-server.service"
MOUNT_UNITS = {kind: f"mlflow-replay-demo-{kind}.service" for kind in ("metrics", "artifacts")}
MOUNT_DIR = "/srv/mlflow-replay/demo"
# How often each fault is repeated; docs/reliability.md quotes medians of 3.
REPETITIONS = int(os.environ.get("MLFLOW_REPLAY_FAULT_REPETITIONS", "1"))
# Generous bounds for waits, not measured times (those are in docs/reliability.md).
RECOVERY_TIMEOUT = 180
OUTAGE_SECONDS = 60


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    created = make_replay(tmp_path_factory.mktemp("faults-native"), bench, [node], s3)
    first = created.runner("apply")
    assert first.returncode == 0, first.output
    second = created.runner("apply")
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0, second.output
    yield created
    created.runner("teardown")


@pytest.fixture(scope="module")
def probed_run(published_store):
    """The ID of a run with artifacts, whose artifact tab the watch lists."""
    return next(run for run in published_store.runs if run.artifacts).run_id


def restarts(node, unit: str) -> int:
    return int(node.run(f"systemctl show -p NRestarts --value {unit}").stdout.strip())


def wait_for_restart(node, unit: str, before: int, timeout: float = RECOVERY_TIMEOUT) -> None:
    """Wait until systemd has restarted `unit` at least once since its count was `before`."""
    deadline = time.monotonic() + timeout
    while restarts(node, unit) <= before:
        assert time.monotonic() < deadline, f"systemd did not restart {unit} within {timeout} s"
        time.sleep(0.5)


def kill_main_process(node, unit: str) -> None:
    pid = node.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
    assert pid not in ("", "0"), f"{unit} has no main process"
    node.run(f"kill -KILL {pid}")


def report(fault: str, seconds: list[float], watch: ViewerWatch | None = None, expected: int = 0) -> None:
    """Print the recovery times and what the watching user saw, for docs/reliability.md."""
    line = f"FAULT-TIMING native {fault}: median {statistics.median(seconds):.1f} s of {[round(s, 1) for s in seconds]}"
    if watch is not None:
        failed = [probe for probe in watch.probes if not probe.full(expected)]
        errors = sorted({probe.error or f"partial answer {probe}" for probe in failed})[:5]
        line += f"; {len(failed)} of {len(watch.probes)} probes not full: {errors}"
    print(line)


def mount_live(node, kind: str) -> bool:
    """Return whether the replay's `kind` mount is an rclone FUSE mount that lists the container."""
    path = f"{MOUNT_DIR}/{kind}"
    fstype = node.run(f"findmnt --noheadings --output FSTYPE --mountpoint {path}", check=False).stdout.split()
    if fstype != ["fuse.rclone"]:
        return False
    return bool(node.run(f"ls {path}", check=False, timeout=30).stdout.split())


def wait_for_mount(node, kind: str, timeout: float = RECOVERY_TIMEOUT) -> float:
    """Wait until the `kind` mount is live again; return the monotonic time it was."""
    deadline = time.monotonic() + timeout
    while not mount_live(node, kind):
        assert time.monotonic() < deadline, f"the {kind} mount is not live {timeout} s after the fault"
        time.sleep(0.5)
    return time.monotonic()


def download_artifact(published_store) -> str:
    """Download one artifact through the viewer as the UI's preview does; describe the outcome."""
    run = next(run for run in published_store.runs if run.artifacts)
    path = sorted(run.artifacts)[0]
    query = urllib.parse.urlencode({"path": path, "run_uuid": run.run_id})
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"{VIEWER_URL}/get-artifact?{query}", timeout=30) as response:
            size = len(response.read())
        return f"{size} bytes in {time.monotonic() - started:.1f} s"
    except OSError as error:
        return f"failed after {time.monotonic() - started:.1f} s: {error}"


def test_mlflow_killed_restarts(replay, node, published_store, probed_run):
    expected = len(published_store.experiments)
    seconds = []
    with ViewerWatch(VIEWER_URL, probed_run) as watch:
        for _ in range(REPETITIONS):
            before = restarts(node, SERVER_UNIT)
            started = time.monotonic()
            kill_main_process(node, SERVER_UNIT)
            wait_for_restart(node, SERVER_UNIT, before)
            recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)
            seconds.append(recovered - started)

    report("MLflow killed", seconds, watch, expected)
    assert node.run(f"systemctl is-active {SERVER_UNIT}", check=False).stdout.strip() == "active"
    assert viewer_differences(VIEWER_URL, published_store) == []


@pytest.mark.parametrize("kind", ["artifacts", "metrics"])
def test_rclone_killed_recovers(replay, node, published_store, probed_run, kind):
    expected = len(published_store.experiments)
    unit = MOUNT_UNITS[kind]
    seconds = []
    with ViewerWatch(VIEWER_URL, probed_run) as watch:
        for _ in range(REPETITIONS):
            before = restarts(node, unit)
            started = time.monotonic()
            kill_main_process(node, unit)
            wait_for_restart(node, unit, before)
            mounted = wait_for_mount(node, kind)
            recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)
            seconds.append(max(mounted, recovered) - started)

    report(f"rclone ({kind} mount) killed", seconds, watch, expected)
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_endpoint_outage_keeps_snapshot(replay, node, published_store, probed_run):
    expected = len(published_store.experiments)
    with ViewerWatch(VIEWER_URL, probed_run) as watch:
        with endpoint_outage(S3_NETNS, S3_PORT):
            outage_start = time.monotonic()
            during = replay.runner("status")
            status_seconds = time.monotonic() - outage_start
            # Recorded, not asserted: whether a file read fails during the
            # outage depends on what rclone's caches contain.
            download = download_artifact(published_store)
            time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - outage_start)))
            outage_end = time.monotonic()
        recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)

    assert during.returncode == 3, during.output
    assert "endpoint unreachable" in during.output, during.output
    assert "the viewer still serves the snapshot of" in during.output, during.output
    searches = [probe.experiments for probe in watch.between(outage_start, outage_end)]
    assert searches, "the watch made no probe during the outage"
    assert set(searches) == {expected}, f"experiments listed during the outage: {searches}"
    report("endpoint outage (time after it ended)", [max(0.0, recovered - outage_end)], watch, expected)
    print(f"FAULT-TIMING native status during the outage took {status_seconds:.1f} s; "
          f"an artifact download during it: {download}")
    for kind in MOUNT_UNITS:
        assert mount_live(node, kind), f"the {kind} mount is not live after the outage"
    assert viewer_differences(VIEWER_URL, published_store) == []
    after = replay.runner("status")
    assert after.returncode == 0, after.output


def test_reboot_serves_full_store(replay, node, published_store, probed_run):
    expected = len(published_store.experiments)
    seconds = []
    for _ in range(REPETITIONS):
        started = time.monotonic()
        node.reboot(timeout=RECOVERY_TIMEOUT)
        recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)
        seconds.append(recovered - started)

    report("node reboot", seconds)
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_apply_after_faults_changes_nothing(replay, node):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0, result.output
