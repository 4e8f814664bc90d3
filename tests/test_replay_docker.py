"""End to end: the docker runtime on a real Debian 13 node that starts without Docker.

The steps run in file order and share one node. The MLflow image comes from
testbench.image (built once and cached in the bench state directory), is copied
onto the node as a `docker save` tar, and apply loads it from there
(replay_docker_image_archive), because no container registry is reachable.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request

import pytest

from testbench.compare import viewer_differences
from testbench.image import copy_image_archive, ensure_image_archive, image_name
from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

MLFLOW_VERSION = "3.17.2"
NODE = ("dnode", node_address(31))
BUILDER_ADDRESS = node_address(40)
VIEWER_URL = f"http://{NODE[1]}:8000"
IMAGE_ARCHIVE_ON_NODE = "/var/tmp/mlflow-replay-image.tar"
PROJECT = "mlflow-replay-demo"
PROJECT_DIR = "/opt/mlflow-replay/stacks/demo"
STACK_UNIT = "mlflow-replay-demo-stack.service"
NATIVE_UNIT = "mlflow-replay-demo-server.service"
MLFLOW_VENV = f"/opt/mlflow-replay/mlflow-{MLFLOW_VERSION}"


@pytest.fixture(scope="module")
def node(bench):
    archive = ensure_image_archive(bench, MLFLOW_VERSION, BUILDER_ADDRESS)
    (booted,) = bench.boot([NODE], suite="trixie", docker=True)
    copy_image_archive(booted, archive, IMAGE_ARCHIVE_ON_NODE)
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    created = make_replay(tmp_path_factory.mktemp("docker"), bench, [node], s3, runtime="docker")
    with created.inventory.open("a") as inventory:
        inventory.write(f"replay_docker_image={image_name(MLFLOW_VERSION)}\n")
        inventory.write("replay_docker_image_pull=never\n")
        inventory.write(f"replay_docker_image_archive={IMAGE_ARCHIVE_ON_NODE}\n")
    return created


def apply_twice(replay, node):
    """Run apply, then apply again and require changed=0 on the second run."""
    first = replay.runner("apply")
    assert first.returncode == 0, first.output
    second = replay.runner("apply")
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0, second.output
    return first


def project_containers(node) -> list[str]:
    result = node.run(f"docker ps --all --quiet --no-trunc --filter label=com.docker.compose.project={PROJECT}")
    return result.stdout.split()


def fetch_json(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def wait_for_viewer(url: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            fetch_json(f"{url}/api/2.0/mlflow/experiments/search?max_results=1000")
            return
        except (OSError, urllib.error.URLError, ValueError):
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


def test_apply_installs_docker_and_serves(replay, node, published_store):
    assert node.run("command -v docker", check=False).returncode != 0

    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["failed"] == 0
    assert node.run("docker compose version --short").returncode == 0
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_second_apply_changes_nothing(replay, node):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0


def test_apply_deploys_stack_only(node):
    env_mode = node.run(f"stat -c '%a %U' {PROJECT_DIR}/mlflow.env").stdout.split()
    assert env_mode == ["600", "root"]
    assert node.run(f"systemctl is-active {STACK_UNIT}", check=False).stdout.strip() == "active"
    assert node.run(f"systemctl is-enabled {STACK_UNIT}", check=False).stdout.strip() == "enabled"
    assert len(project_containers(node)) == 1
    restart_policy = node.run(
        f"docker inspect --format '{{{{.HostConfig.RestartPolicy.Name}}}}' {project_containers(node)[0]}"
    ).stdout.strip()
    assert restart_policy == "on-failure"
    assert node.run(f"test -e /etc/systemd/system/{NATIVE_UNIT}", check=False).returncode != 0
    assert node.run(f"test -e {MLFLOW_VENV}", check=False).returncode != 0


def test_settings_change_recreates_container_once(replay, node, published_store):
    (before,) = project_containers(node)
    started = node.run("date +%s").stdout.strip()
    settings = replay.settings()
    settings["workers"] = 3
    replay.write_settings(settings)

    changed = replay.runner("apply")
    rerun = replay.runner("apply")

    assert changed.returncode == 0, changed.output
    assert changed.recap(node.name)["changed"] > 0
    created = node.run(
        f"docker events --since {started} --until $(date +%s) --filter type=container --filter event=create "
        f"--filter label=com.docker.compose.project={PROJECT} --format '{{{{.ID}}}}'"
    ).stdout.split()
    assert len(created) == 1, created
    (after,) = project_containers(node)
    assert after != before
    assert "--workers=3" in node.run(f"cat {PROJECT_DIR}/compose.yaml").stdout
    assert rerun.returncode == 0, rerun.output
    assert rerun.recap(node.name)["changed"] == 0
    assert viewer_differences(VIEWER_URL, published_store) == []


def container_started_at(node) -> str:
    (container,) = project_containers(node)
    return node.run(f"docker inspect --format '{{{{.State.StartedAt}}}}' {container}").stdout.strip()


def wait_until_active(node, unit: str, timeout: float = 240) -> str:
    """Return the unit's state once it is no longer activating, or at the timeout."""
    deadline = time.monotonic() + timeout
    state = node.run(f"systemctl is-active {unit}", check=False).stdout.strip()
    while state == "activating" and time.monotonic() < deadline:
        time.sleep(1)
        state = node.run(f"systemctl is-active {unit}", check=False).stdout.strip()
    return state


def test_metrics_mount_restart_keeps_serving(node, published_store):
    started_before = container_started_at(node)

    node.run("systemctl restart mlflow-replay-demo-metrics.service", timeout=240)

    assert wait_until_active(node, STACK_UNIT) == "active"
    assert container_started_at(node) != started_before
    wait_for_viewer(VIEWER_URL)
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_artifacts_mount_restart_keeps_serving(node, published_store):
    started_before = container_started_at(node)

    node.run("systemctl restart mlflow-replay-demo-artifacts.service", timeout=240)

    assert wait_until_active(node, STACK_UNIT) == "active"
    assert container_started_at(node) != started_before
    wait_for_viewer(VIEWER_URL)
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_reboot_serves_full_store(node, published_store):
    with_artifacts = next(run for run in published_store.runs if run.artifacts)
    experiments_url = f"{VIEWER_URL}/api/2.0/mlflow/experiments/search?max_results=1000&view_type=ALL"
    artifacts_url = f"{VIEWER_URL}/api/2.0/mlflow/artifacts/list?run_id={with_artifacts.run_id}"
    answers: list[tuple[int, int]] = []
    stop = threading.Event()

    def poll():
        while not stop.is_set():
            try:
                experiments = fetch_json(experiments_url, timeout=2).get("experiments", [])
                files = fetch_json(artifacts_url, timeout=2).get("files", [])
                answers.append((len(experiments), len(files)))
            except (OSError, urllib.error.URLError, ValueError):
                pass
            time.sleep(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    try:
        node.reboot(timeout=240)
        wait_for_viewer(VIEWER_URL)
        time.sleep(2)
    finally:
        stop.set()
        poller.join()

    assert answers, "the viewer never answered during and after the reboot"
    assert min(count for count, _ in answers) == len(published_store.experiments), answers
    assert min(files for _, files in answers) > 0, answers
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_switch_to_native_and_back(replay, node, published_store):
    settings = replay.settings()
    settings["runtime"] = "native"
    replay.write_settings(settings)

    apply_twice(replay, node)

    assert viewer_differences(VIEWER_URL, published_store) == []
    assert project_containers(node) == []
    assert node.run(f"test -e {PROJECT_DIR}", check=False).returncode != 0
    assert node.run(f"test -e /etc/systemd/system/{STACK_UNIT}", check=False).returncode != 0
    assert node.run(f"docker image inspect {image_name(MLFLOW_VERSION)}", check=False).returncode != 0

    settings["runtime"] = "docker"
    replay.write_settings(settings)

    apply_twice(replay, node)

    assert viewer_differences(VIEWER_URL, published_store) == []
    assert node.run(f"test -e /etc/systemd/system/{NATIVE_UNIT}", check=False).returncode != 0
    assert node.run(f"test -e {MLFLOW_VENV}", check=False).returncode != 0
    assert node.run("id mlflow-replay", check=False).returncode != 0


def assert_stack_removed(node):
    assert project_containers(node) == []
    assert node.run(f"docker image inspect {image_name(MLFLOW_VERSION)}", check=False).returncode != 0
    assert node.run(f"test -e {PROJECT_DIR}", check=False).returncode != 0
    assert node.run(f"test -e /etc/systemd/system/{STACK_UNIT}", check=False).returncode != 0
    networks = node.run(f"docker network ls --quiet --filter label=com.docker.compose.project={PROJECT}").stdout
    assert networks.strip() == ""


def test_teardown_twice_removes_stack(replay, node):
    first = replay.runner("teardown")
    second = replay.runner("teardown")

    assert first.returncode == 0, first.output
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0
    assert_stack_removed(node)


def test_teardown_after_project_dir_deleted(replay, node):
    applied = replay.runner("apply")
    assert applied.returncode == 0, applied.output
    node.run(f"rm -rf {PROJECT_DIR}")

    first = replay.runner("teardown")
    second = replay.runner("teardown")

    assert first.returncode == 0, first.output
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0
    assert_stack_removed(node)
