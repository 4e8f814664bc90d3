"""Drift repair: break a replayed node in each way it drifts, re-apply, check.

Each case breaks one thing on a node that serves the sample store, runs
`apply`, and asserts that the viewer serves the full store again and that
only the tasks that repair that thing reported a change. A third apply must
then report no change at all.
"""

from __future__ import annotations

import pytest

from testbench.compare import viewer_differences
from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("drift1", node_address(12))
VIEWER_URL = f"http://{NODE[1]}:8000"
METRICS_UNIT = "mlflow-replay-demo-metrics.service"
SERVER_UNIT = "mlflow-replay-demo-server.service"

START_MOUNTS = "Start the mounts and enable them at boot"
RESTART_MOUNTS = "Restart the mounts whose unit or rclone.conf changed"
REPAIR_MOUNTS = "Restart the mounts that are not serving their container"
START_SERVERS = "Start the servers and enable them at boot"
RESTART_SERVERS = "Restart the servers whose unit, snapshot or MLflow changed"
MLFLOW_PYTHON = "/opt/mlflow-replay/mlflow-3.17.2/bin/python"
RCLONE = "/opt/mlflow-replay/rclone-1.75.2/bin/rclone"

# name: (shell command that breaks the node, tasks allowed to report a change)
# systemd restarts a killed rclone by itself (Restart=on-failure), so that
# drift may be repaired before apply looks: it alone may report no change.
SELF_HEALING = {"rclone killed"}
DRIFTS = {
    "metrics mount stopped": (
        f"systemctl stop {METRICS_UNIT}",
        {START_MOUNTS},
    ),
    "rclone killed": (
        f"kill -9 $(systemctl show -p MainPID --value {METRICS_UNIT})",
        {START_MOUNTS, REPAIR_MOUNTS},
    ),
    "rclone.conf edited": (
        "sed -i 's/^endpoint = .*/endpoint = http:\\/\\/127.0.0.1:1/' /etc/mlflow-replay/demo/rclone.conf",
        {"Write each replay's rclone.conf", RESTART_MOUNTS},
    ),
    "rclone.conf deleted": (
        "rm /etc/mlflow-replay/demo/rclone.conf",
        {"Write each replay's rclone.conf", RESTART_MOUNTS},
    ),
    "mount unit edited": (
        f"sed -i 's/--read-only/--read-only --no-modtime/' /etc/systemd/system/{METRICS_UNIT}",
        {"Write the mount units", RESTART_MOUNTS},
    ),
    "server stopped": (
        f"systemctl stop {SERVER_UNIT}",
        {START_SERVERS},
    ),
    "snapshot deleted": (
        "rm /var/lib/mlflow-replay/demo/snapshot.db",
        {"Import the store when it changed since the last import", RESTART_SERVERS},
    ),
    "virtualenv deleted": (
        "rm -rf /opt/mlflow-replay/mlflow-3.17.2",
        {"Install MLflow 3.17.2", "Mark the MLflow virtualenv as complete", RESTART_SERVERS},
    ),
    # What a pip run killed part way leaves: the metadata names the pinned
    # release, a module is missing and the install mark was never written.
    "MLflow install unfinished": (
        "rm /opt/mlflow-replay/mlflow-3.17.2/installed-by-mlflow-replay "
        "/opt/mlflow-replay/mlflow-3.17.2/lib/python3*/site-packages/mlflow/genai/utils/trace_utils.py",
        {"Remove the virtualenv that an earlier install did not finish", "Install MLflow 3.17.2",
         "Mark the MLflow virtualenv as complete", RESTART_SERVERS},
    ),
    "rclone install unfinished": (
        "rm /opt/mlflow-replay/rclone-1.75.2/installed-by-mlflow-replay /opt/mlflow-replay/rclone-1.75.2/bin/rclone",
        {"Remove the mark of a complete rclone install", "Install the pinned rclone wheel",
         "Mark the rclone install as complete"},
    ),
    "mount directory removed": (
        "fusermount3 -uz /srv/mlflow-replay/demo/metrics; rm -rf /srv/mlflow-replay/demo/metrics",
        {"Create the mount points", START_MOUNTS, REPAIR_MOUNTS},
    ),
}


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    replay = make_replay(tmp_path_factory.mktemp("drift"), bench, [node], s3)
    first = replay.runner("apply")
    assert first.returncode == 0, first.output
    yield replay
    replay.runner("teardown")


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_apply_repairs_drift(replay, node, published_store, drift):
    command, allowed = DRIFTS[drift]
    node.run(command)

    repair = replay.runner("apply")

    assert repair.returncode == 0, repair.output
    changed = repair.changed_tasks(node.name)
    if drift not in SELF_HEALING:
        assert changed, "apply reported no change after the node drifted"
    assert changed <= allowed, f"unexpected changes: {sorted(changed - allowed)}"
    assert viewer_differences(VIEWER_URL, published_store) == []
    assert node.run("ls /srv/mlflow-replay/demo/metrics/0/meta.yaml", check=False).returncode == 0
    assert node.run(f"{MLFLOW_PYTHON} -c 'import mlflow.genai.utils.trace_utils'", check=False).returncode == 0
    assert node.run(f"{RCLONE} version", check=False).returncode == 0
    again = replay.runner("apply")
    assert again.recap(node.name)["changed"] == 0
