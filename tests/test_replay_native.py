"""End to end: apply, re-apply and teardown of the native runtime on a real node.

The steps run in file order and share one node: each test checks one
promise of the walking skeleton against the real node, S3 server and MLflow.
"""

from __future__ import annotations

import socket

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
    # The node is as the first apply left it: the record lets apply stop
    # early, so no task of the later roles starts.
    assert "TASK Write the mount units" not in result.output
    assert f"open http://{NODE[1]}:8000/" in result.output


def test_record_off_runs_every_role(replay, node):
    inventory = replay.inventory.read_text()
    replay.inventory.write_text(inventory + "\n[replay_nodes:vars]\nreplay_record_enabled=false\n")
    try:
        result = replay.runner("apply")
    finally:
        replay.inventory.write_text(inventory)

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0
    assert f"TASK Write the mount units\n  {node.name}: ok" in result.output


# Rolling out a vars change: only the units that depend on the changed value
# restart, each exactly once, and the apply after that changes nothing.
UNIT_STARTED = "MESSAGE_ID=39f53479d3a045ac8e11786248231fbf"  # systemd's "unit started" entry
METRICS_UNIT, ARTIFACTS_UNIT, SERVER_UNIT = CREATED_UNITS
IMPORT_TASK = "Import the store when it changed since the last import"
NEW_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "rotated-access-key", "AWS_SECRET_ACCESS_KEY": "rotated-secret-key-0042"}
ENDPOINT_ALIAS = "objectstore"  # one label: moto reads a dotted host name as a bucket


def unit_starts(node, since: str) -> dict[str, int]:
    """Return how often each replay unit started on `node` since epoch second `since`."""
    counts = {}
    for unit in CREATED_UNITS:
        entries = node.run(f"journalctl --quiet --no-pager -o cat --since @{since} UNIT={unit} {UNIT_STARTED}").stdout
        counts[unit] = len(entries.splitlines())
    return counts


def apply_change(replay, node, **settings_changes) -> tuple[dict[str, int], set[str]]:
    """Apply the vars file with `settings_changes` and then once more.

    Returns the unit start counts and the changed tasks of the first apply;
    asserts that both succeed and that the second changes nothing.
    """
    replay.write_settings({**replay.settings(), **settings_changes})
    since = node.run("date +%s").stdout.strip()
    node.run("sleep 1")
    first = replay.runner("apply", env=NEW_CREDENTIALS)
    assert first.returncode == 0, first.output
    starts = unit_starts(node, since)
    second = replay.runner("apply", env=NEW_CREDENTIALS)
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0, second.changed_tasks(node.name)
    return starts, first.changed_tasks(node.name)


def viewer_url(replay) -> str:
    return f"http://{NODE[1]}:{replay.settings()['port']}"


def test_check_diff_on_applied_node_shows_masked_change(replay, node, s3):
    node.run(f"echo '{s3.endpoint.split('//')[1].split(':')[0]} {ENDPOINT_ALIAS}' >> /etc/hosts")
    replay.write_settings({**replay.settings(), "endpoint": f"http://{ENDPOINT_ALIAS}:9000"})
    config_before = node.run("sha256sum /etc/mlflow-replay/demo/rclone.conf").stdout
    since = node.run("date +%s").stdout.strip()
    node.run("sleep 1")

    result = replay.runner("apply", "--check", "--diff", env=NEW_CREDENTIALS)

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] > 0
    assert "+secret_access_key = <hidden, changed>" in result.output
    assert f"+endpoint = http://{ENDPOINT_ALIAS}:9000" in result.output
    for secret in (s3.secret_key, NEW_CREDENTIALS["AWS_SECRET_ACCESS_KEY"]):
        assert secret not in result.output
    assert node.run("sha256sum /etc/mlflow-replay/demo/rclone.conf").stdout == config_before
    assert unit_starts(node, since) == dict.fromkeys(CREATED_UNITS, 0)
    replay.write_settings({**replay.settings(), "endpoint": s3.endpoint})


def test_new_key_restarts_only_the_mounts_once(replay, node, published_store):
    starts, _ = apply_change(replay, node)

    assert starts == {METRICS_UNIT: 1, ARTIFACTS_UNIT: 1, SERVER_UNIT: 0}
    assert viewer_differences(viewer_url(replay), published_store) == []


def test_new_endpoint_restarts_only_the_mounts_once(replay, node, published_store):
    starts, _ = apply_change(replay, node, endpoint=f"http://{ENDPOINT_ALIAS}:9000")

    assert starts == {METRICS_UNIT: 1, ARTIFACTS_UNIT: 1, SERVER_UNIT: 0}
    assert viewer_differences(viewer_url(replay), published_store) == []


def test_new_container_restarts_its_mount_once(replay, node, s3, published_store):
    copy = f"{published_store.metrics_bucket}-copy"
    s3.create_bucket(copy)
    for key in s3.list_keys(published_store.metrics_bucket):
        s3.client().copy_object(Bucket=copy, Key=key, CopySource={"Bucket": published_store.metrics_bucket, "Key": key})

    starts, changed = apply_change(replay, node, metrics_container=copy)

    # The copies are new objects, so the store may be imported again; the
    # server restarts exactly when it was.
    reimported = IMPORT_TASK in changed
    assert starts == {METRICS_UNIT: 1, ARTIFACTS_UNIT: 0, SERVER_UNIT: int(reimported)}
    assert viewer_differences(viewer_url(replay), published_store) == []


def test_new_port_restarts_only_the_server_once(replay, node, published_store):
    old_port = replay.settings()["port"]

    starts, _ = apply_change(replay, node, port=8100)

    assert starts == {METRICS_UNIT: 0, ARTIFACTS_UNIT: 0, SERVER_UNIT: 1}
    assert viewer_differences(viewer_url(replay), published_store) == []
    with pytest.raises(OSError):
        socket.create_connection((NODE[1], old_port), timeout=5).close()


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
    port = replay.settings()["port"]
    assert node.run(f"ss -ltn 'sport = :{port}' | grep -q LISTEN", check=False).returncode != 0


def test_second_teardown_succeeds(replay, node):
    result = replay.runner("teardown")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["failed"] == 0


def test_apply_after_teardown_brings_everything_back(replay, node, published_store):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert viewer_differences(viewer_url(replay), published_store) == []
    again = replay.runner("apply")
    assert again.returncode == 0, again.output
    assert again.recap(node.name)["changed"] == 0, again.changed_tasks(node.name)
