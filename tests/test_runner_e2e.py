"""End to end: runner.py's output, exit codes, status, secrets and logs on a real node.

The steps run in file order and share one node: apply with a canary secret,
re-apply through a vault-encrypted secrets file, status, an unreachable host,
teardown, then a node-local failure. Every step searches for the canary.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("runner1", node_address(25))
# On the bench subnet, where no node runs.
GHOST = ("ghost", node_address(99))
VIEWER_URL = f"http://{NODE[1]}:8000/"
RCLONE_CONF = "/etc/mlflow-replay/demo/rclone.conf"
CANARY = f"mlr-canary-{secrets.token_hex(8)}"
ESCAPE = "\x1b"
VAULT_BINARY = str(Path(os.sys.executable).parent / "ansible-vault")


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def state_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("state")


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    return make_replay(tmp_path_factory.mktemp("runner"), bench, [node], s3)


def run(replay, state_home, *arguments, **env):
    """Run runner.py with the canary secret and a private log directory."""
    environment = {"AWS_SECRET_ACCESS_KEY": CANARY, "XDG_STATE_HOME": str(state_home), **env}
    return replay.runner(*arguments, env=environment)


class ProcessListWatch:
    """Poll `ps -eww -o args` on the control host and on the node during a run."""

    def __init__(self, node):
        self.node = node
        self.hits: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.wait(0.5):
            local = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True, check=False).stdout
            remote = self.node.run("ps -eww -o args", check=False).stdout
            self.hits += [f"control: {line}" for line in local.splitlines() if CANARY in line]
            self.hits += [f"node: {line}" for line in remote.splitlines() if CANARY in line]

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()


def files_containing_canary_on_control(state_home: Path) -> list[str]:
    """Return the files that contain the canary in the project, the logs and this session's temporary files.

    state_home is inside pytest's base temporary directory, which also holds
    the vars files, inventories and the vault-encrypted secrets file.
    """
    base_temp = state_home.parent
    return subprocess.run(["grep", "-rlsF", "-e", CANARY, str(PROJECT_ROOT), str(base_temp)],
                          capture_output=True, text=True, check=False).stdout.split()


def files_containing_canary_on_node(node) -> list[str]:
    command = ("grep -rlsF --exclude-dir=proc --exclude-dir=sys --exclude-dir=dev "
               f"-e {CANARY} / | grep -vxF {RCLONE_CONF} || true")
    return node.run(command, check=False, timeout=300).stdout.split()


def test_apply_prints_progress_and_recap(replay, node, state_home):
    with ProcessListWatch(node) as watch:
        result = run(replay, state_home, "apply")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["failed"] == 0
    assert ESCAPE not in result.output
    assert f"open {VIEWER_URL}" in result.output
    assert re.search(r"finished in \d+ s", result.output)
    # A no_log loop task that wrote files shows as changed, not ok.
    assert re.search(r"TASK Write each replay's rclone.conf\n  runner1: changed\n", result.output), result.output
    assert watch.hits == []
    assert CANARY not in result.output


def test_apply_keeps_secret_in_rclone_conf_only(node, state_home):
    listing = node.run(f"stat -c '%a %U %G' {RCLONE_CONF}").stdout.split()
    contents = node.run(f"cat {RCLONE_CONF}").stdout

    assert listing == ["600", "root", "root"]
    assert CANARY in contents
    assert files_containing_canary_on_node(node) == []
    assert files_containing_canary_on_control(state_home) == []


def test_apply_writes_private_scrubbed_log(state_home):
    logs = sorted((state_home / "mlflow-replay" / "logs").glob("*-apply.log"))

    assert logs
    assert stat.S_IMODE(logs[-1].stat().st_mode) == 0o600
    assert stat.S_IMODE(logs[-1].parent.stat().st_mode) == 0o700
    text = logs[-1].read_text()
    assert "PLAY RECAP" in text
    assert CANARY not in text


def test_apply_with_vault_secrets_changes_nothing(replay, node, state_home, tmp_path):
    secrets_file = tmp_path / "secrets.yml"
    secrets_file.write_text(f"mlflow_replay_access_key_id: {replay.s3.access_key}\n"
                            f"mlflow_replay_secret_access_key: {CANARY}\n")
    password_file = tmp_path / "vault-password"
    password_file.write_text("bench vault password\n")
    subprocess.run([VAULT_BINARY, "encrypt", "--vault-password-file", str(password_file), str(secrets_file)],
                   check=True, capture_output=True)

    result = run(replay, state_home, "apply", "--json", "--secrets", str(secrets_file),
                 AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="", ANSIBLE_VAULT_PASSWORD_FILE=str(password_file))

    assert result.returncode == 0, result.output
    document = json.loads(result.output)
    assert document["exit_code"] == 0
    assert document["hosts"][node.name]["changed"] == 0
    assert document["hosts"][node.name]["failed"] == 0
    assert document["replays"][0]["urls"] == [VIEWER_URL]
    assert document["replays"][0]["experiments"]
    assert document["failures"] == []
    assert CANARY not in Path(document["log"]).read_text()


def test_apply_without_credentials_is_invalid(replay, state_home):
    result = run(replay, state_home, "apply", AWS_ACCESS_KEY_ID="", AWS_SECRET_ACCESS_KEY="")

    assert result.returncode == 2
    assert "AWS_ACCESS_KEY_ID: is not set" in result.output


def test_status_reports_healthy_replay(replay, node, state_home):
    result = run(replay, state_home, "status")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] == 0
    assert re.search(rf"runner1\s+demo\s+metrics=active,artifacts=active\s+\S+ \S+\s+\S+ \S+\s+no\s+ok\s+{VIEWER_URL}",
                     result.output), result.output


def test_status_json_in_check_mode(replay, node, state_home):
    node.run("touch -d '2 hours ago' /var/lib/mlflow-replay/demo/snapshot.db")

    result = run(replay, state_home, "status", "--check", "--json")

    assert result.returncode == 0, result.output
    document = json.loads(result.output)
    (report,) = document["status"]
    assert document["hosts"][node.name]["changed"] == 0
    assert report["healthy"] is True
    assert report["mounts"] == {"metrics": "active", "artifacts": "active"}
    assert 7000 <= report["snapshot"]["age_seconds"] < 7400
    assert report["snapshot"]["bytes"] > 0
    assert report["source"]["changed"] is False
    assert report["search"]["experiments"]
    assert report["urls"] == [VIEWER_URL]


def test_unreachable_host_exits_4(replay, bench, node, state_home, tmp_path):
    inventory = replay.inventory.read_text().replace(
        f"{node.name} ansible_host={node.address}\n",
        f"{node.name} ansible_host={node.address}\n{GHOST[0]} ansible_host={GHOST[1]}\n")
    assert GHOST[0] in inventory
    (tmp_path / "inventory.ini").write_text(inventory)

    result = replay.runner("apply", "--json", "--inventory", str(tmp_path / "inventory.ini"),
                           env={"AWS_SECRET_ACCESS_KEY": CANARY, "XDG_STATE_HOME": str(state_home)})

    assert result.returncode == 4, result.output
    document = json.loads(result.output)
    assert document["hosts"][GHOST[0]]["unreachable"] == 1
    assert document["hosts"][node.name]["failed"] == 0
    assert document["hosts"][node.name]["changed"] == 0
    assert document["replays"][0]["host"] == node.name
    assert any(f["host"] == GHOST[0] for f in document["failures"])


def test_teardown_then_status_is_unhealthy(replay, node, state_home):
    with ProcessListWatch(node) as watch:
        teardown = run(replay, state_home, "teardown")
    status = run(replay, state_home, "status")

    assert teardown.returncode == 0, teardown.output
    assert watch.hits == []
    assert CANARY not in teardown.output
    assert status.returncode == 3, status.output
    assert status.recap(node.name)["changed"] == 0
    assert "UNHEALTHY runner1 demo: mount metrics is inactive" in status.output
    assert "UNHEALTHY runner1 demo: no snapshot imported" in status.output


def test_secret_gone_after_teardown(node, state_home):
    assert node.run(f"test -e {RCLONE_CONF}", check=False).returncode != 0
    assert files_containing_canary_on_node(node) == []
    assert files_containing_canary_on_control(state_home) == []
    logs = list((state_home / "mlflow-replay" / "logs").iterdir())
    assert logs
    assert [log.name for log in logs if CANARY in log.read_text()] == []


def test_failing_task_names_host_task_and_item(replay, node, state_home):
    node.run("touch /srv/mlflow-replay")
    try:
        result = run(replay, state_home, "apply")
    finally:
        node.run("rm -f /srv/mlflow-replay")
        run(replay, state_home, "teardown")

    assert result.returncode == 1, result.output
    assert result.recap(node.name)["failed"] == 1
    failure = re.search(r"FAILED on runner1, task '([^']+)':\n  (.+)", result.output)
    assert failure, result.output
    assert failure.group(1) == "Create the mount points"
    assert failure.group(2).startswith("item /srv/mlflow-replay/demo/metrics: ")
