"""End to end: apply, re-apply and teardown of the native runtime on a real node.

The steps run in file order and share one node: each test checks one
promise of the walking skeleton against the real node, S3 server and MLflow.
"""

from __future__ import annotations

import pytest

from testbench.compare import viewer_differences
from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("node1", node_address(11))
VIEWER_URL = f"http://{NODE[1]}:8000"

# Everything apply creates on a node, by kind; teardown must remove each.
CREATED_PATHS = (
    "/etc/mlflow-replay",
    "/var/lib/mlflow-replay",
    "/var/cache/mlflow-replay",
    "/srv/mlflow-replay",
    "/opt/mlflow-replay",
    "/usr/local/libexec/mlflow-replay",
    "/etc/systemd/system/mlflow-replay-demo-metrics.service",
    "/etc/systemd/system/mlflow-replay-demo-artifacts.service",
    "/etc/systemd/system/mlflow-replay-demo-server.service",
)
CREATED_UNITS = (
    "mlflow-replay-demo-metrics.service",
    "mlflow-replay-demo-artifacts.service",
    "mlflow-replay-demo-server.service",
)


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    return make_replay(tmp_path_factory.mktemp("native"), bench, [node], s3)


def test_apply_serves_published_store(replay, node, published_store):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["failed"] == 0
    assert f"open {VIEWER_URL}/" in result.output
    assert viewer_differences(VIEWER_URL, published_store) == []


def test_apply_runs_read_only_pipeline(node):
    mounts = node.run("findmnt --raw --noheadings --types fuse.rclone --output TARGET,OPTIONS").stdout

    assert "/srv/mlflow-replay/demo/metrics ro," in mounts
    assert "/srv/mlflow-replay/demo/artifacts ro," in mounts
    for unit in CREATED_UNITS:
        assert node.run(f"systemctl is-active {unit}", check=False).stdout.strip() == "active", unit
    config_mode = node.run("stat -c '%a %U' /etc/mlflow-replay/demo/rclone.conf").stdout.split()
    assert config_mode == ["600", "root"]
    server_user = node.run("systemctl show -p User --value mlflow-replay-demo-server.service").stdout.strip()
    assert server_user == "mlflow-replay"


def test_second_apply_changes_nothing(replay, node):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0


def test_teardown_removes_everything(replay, node):
    result = replay.runner("teardown")

    assert result.returncode == 0, result.output
    for path in CREATED_PATHS:
        assert node.run(f"test -e {path}", check=False).returncode != 0, f"{path} still exists"
    for unit in CREATED_UNITS:
        state = node.run(f"systemctl is-active {unit}", check=False).stdout.strip()
        assert state in ("inactive", "unknown"), f"{unit} is {state}"
    mounts = node.run("findmnt --list --noheadings --types fuse.rclone", check=False).stdout
    assert mounts.strip() == "", f"rclone mounts remain: {mounts}"
    assert node.run("pgrep -f 'rclone mount'", check=False).returncode != 0, "an rclone process remains"
    assert node.run("pgrep -f 'mlflow server'", check=False).returncode != 0, "an MLflow process remains"
    assert node.run("getent passwd mlflow-replay", check=False).returncode != 0, "the service account remains"
    assert node.run("ss -ltn 'sport = :8000' | grep -q LISTEN", check=False).returncode != 0


def test_second_teardown_succeeds(replay, node):
    result = replay.runner("teardown")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["failed"] == 0
