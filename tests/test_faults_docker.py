"""Runtime faults on a docker replay: MLflow container killed, rclone killed, reboot.

One Debian 13 node serves the sample store from the MLflow container for the
whole module (the image comes as in test_replay_docker). Each case injects a
fault while a background watch probes the viewer as an open UI does. It then
waits until the viewer serves the full store again without any `apply`, and
prints a `FAULT-TIMING` line with the recovery time for docs/reliability.md.
The endpoint outage is covered once, by the native module: both runtimes
serve the same snapshot and mounts.
"""

from __future__ import annotations

import os
import statistics
import time

import pytest

from testbench.compare import viewer_differences
from testbench.faults import ViewerWatch, wait_for_full_viewer
from testbench.image import copy_image_archive, ensure_image_archive, image_name
from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

MLFLOW_VERSION = "3.17.2"
NODE = ("fdocker", node_address(56))
BUILDER_ADDRESS = node_address(40)
VIEWER_URL = f"http://{NODE[1]}:8000"
IMAGE_ARCHIVE_ON_NODE = "/var/tmp/mlflow-replay-image.tar"
PROJECT = "mlflow-replay-demo"
STACK_UNIT = "mlflow-replay-demo-stack.service"
MOUNT_UNITS = {kind: f"mlflow-replay-demo-{kind}.service" for kind in ("metrics", "artifacts")}
# How often each fault is repeated; docs/reliability.md quotes medians of 3.
REPETITIONS = int(os.environ.get("MLFLOW_REPLAY_FAULT_REPETITIONS", "1"))
# Generous bounds for waits, not measured times (those are in docs/reliability.md).
RECOVERY_TIMEOUT = 240


@pytest.fixture(scope="module")
def node(bench):
    archive = ensure_image_archive(bench, MLFLOW_VERSION, BUILDER_ADDRESS)
    (booted,) = bench.boot([NODE], suite="trixie", docker=True)
    copy_image_archive(booted, archive, IMAGE_ARCHIVE_ON_NODE)
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    created = make_replay(tmp_path_factory.mktemp("faults-docker"), bench, [node], s3, runtime="docker")
    with created.inventory.open("a") as inventory:
        inventory.write(f"replay_docker_image={image_name(MLFLOW_VERSION)}\n")
        inventory.write("replay_docker_image_pull=never\n")
        inventory.write(f"replay_docker_image_archive={IMAGE_ARCHIVE_ON_NODE}\n")
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


def project_containers(node) -> list[str]:
    result = node.run(f"docker ps --all --quiet --no-trunc --filter label=com.docker.compose.project={PROJECT}")
    return result.stdout.split()


def current_container(node) -> str | None:
    """Return the ID of the project's container, or None unless there is exactly one."""
    containers = project_containers(node)
    return containers[0] if len(containers) == 1 else None


def container_state(node) -> dict[str, str]:
    """Return the single project container's ID, restart count and start time."""
    (container,) = project_containers(node)
    fields = node.run(
        f"docker inspect --format '{{{{.RestartCount}}}} {{{{.State.StartedAt}}}}' {container}"
    ).stdout.split()
    return {"id": container, "restarts": fields[0], "started_at": fields[1]}


def stack_state(node) -> str:
    return node.run(f"systemctl is-active {STACK_UNIT}", check=False).stdout.strip()


def restarts(node, unit: str) -> int:
    return int(node.run(f"systemctl show -p NRestarts --value {unit}").stdout.strip())


def wait_until(condition, what: str, timeout: float = RECOVERY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting until {what}"
        time.sleep(0.5)


def report(fault: str, seconds: list[float], watch: ViewerWatch | None = None, expected: int = 0) -> None:
    """Print the recovery times and what the watching user saw, for docs/reliability.md."""
    line = f"FAULT-TIMING docker {fault}: median {statistics.median(seconds):.1f} s of {[round(s, 1) for s in seconds]}"
    if watch is not None:
        failed = [probe for probe in watch.probes if not probe.full(expected)]
        errors = sorted({probe.error or f"partial answer {probe}" for probe in failed})[:5]
        line += f"; {len(failed)} of {len(watch.probes)} probes not full: {errors}"
    print(line)


def test_stack_restart_policy(replay, node):
    (container,) = project_containers(node)
    policy = node.run(f"docker inspect --format '{{{{.HostConfig.RestartPolicy.Name}}}}' {container}").stdout.strip()

    assert policy == "on-failure"
    assert node.run(f"systemctl show -p ExecStop --value {STACK_UNIT}").stdout.count("compose down") == 1


def test_mlflow_container_killed_restarts(replay, node, published_store, probed_run):
    expected = len(published_store.experiments)
    seconds = []
    with ViewerWatch(VIEWER_URL, probed_run) as watch:
        for _ in range(REPETITIONS):
            before = container_state(node)
            pid = node.run(f"docker inspect --format '{{{{.State.Pid}}}}' {before['id']}").stdout.strip()
            started = time.monotonic()
            # SIGKILL to the container's main process from the node, as the
            # OOM killer does, so Docker records exit status 137.
            node.run(f"kill -KILL {pid}")
            wait_until(lambda: container_state(node)["started_at"] != before["started_at"],
                       "Docker restarted the container")
            recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)
            seconds.append(recovered - started)
            assert container_state(node)["id"] == before["id"], "the container was replaced, not restarted"

    report("MLflow container killed", seconds, watch, expected)
    assert stack_state(node) == "active"
    assert viewer_differences(VIEWER_URL, published_store) == []


@pytest.mark.parametrize("kind", ["artifacts", "metrics"])
def test_rclone_killed_recovers(replay, node, published_store, probed_run, kind):
    expected = len(published_store.experiments)
    unit = MOUNT_UNITS[kind]
    seconds = []
    with ViewerWatch(VIEWER_URL, probed_run) as watch:
        for _ in range(REPETITIONS):
            before = restarts(node, unit)
            container = current_container(node)
            pid = node.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
            started = time.monotonic()
            node.run(f"kill -KILL {pid}")
            wait_until(lambda: restarts(node, unit) > before, f"systemd restarted {unit}")
            # The container's bind of the artifacts mount still shows the dead
            # FUSE mount, so systemd must restart the stack unit with the mount,
            # which creates a new container.
            wait_until(lambda: current_container(node) not in (None, container), "the stack has a new container")
            recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)
            seconds.append(recovered - started)
            # `compose up --wait` ends (and the oneshot unit becomes active) a
            # few seconds after the container first reports healthy.
            wait_until(lambda: stack_state(node) == "active", f"{STACK_UNIT} is active")

    report(f"rclone ({kind} mount) killed", seconds, watch, expected)
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_reboot_serves_full_store(replay, node, published_store, probed_run):
    expected = len(published_store.experiments)
    seconds = []
    for _ in range(REPETITIONS):
        started = time.monotonic()
        node.reboot(timeout=RECOVERY_TIMEOUT)
        recovered = wait_for_full_viewer(VIEWER_URL, probed_run, expected, RECOVERY_TIMEOUT)
        seconds.append(recovered - started)
        assert len(project_containers(node)) == 1

    report("node reboot", seconds)
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_apply_after_faults_changes_nothing(replay, node):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0, result.output


def test_teardown_removes_restartable_stack(replay, node):
    result = replay.runner("teardown")

    assert result.returncode == 0, result.output
    assert project_containers(node) == []
    assert node.run(f"test -e /etc/systemd/system/{STACK_UNIT}", check=False).returncode != 0
    # Includes the mount units' .wants directories that enabling the stack unit created.
    assert node.run("ls -d /etc/systemd/system/mlflow-replay-*", check=False).returncode != 0
