"""Unit tests of the apply record: its module run as Ansible runs it, its filters, and the inputs digest.

The end-to-end tests cover the record on real nodes: every second apply
there stops at the record, and tests/test_drift.py breaks a node in each way
that the record must notice.
"""

from __future__ import annotations

import http.server
import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from mlflow_replay.inputs import inputs_digest
from plugins.filter.record import (
    mlflow_replay_check_only_command,
    mlflow_replay_health_urls,
    mlflow_replay_record_units,
)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
MODULE = PROJECT_ROOT / "roles" / "replay_record" / "library" / "replay_record.py"


def run_module(tmp_path: Path, **arguments) -> dict:
    """Run the module as a script with an arguments file, as Ansible's debugging guide does."""
    arguments_file = tmp_path / "arguments.json"
    arguments_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": arguments}), encoding="utf-8")
    done = subprocess.run([sys.executable, str(MODULE), str(arguments_file)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.fixture
def health_url():
    """Start a loopback HTTP server that returns 200 for every GET, and yield its health URL."""

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/health"
    server.shutdown()
    server.server_close()


@pytest.fixture
def node(tmp_path, health_url):
    """Record a managed tree, a command and a URL once, and return what a check needs."""
    managed = tmp_path / "managed"
    (managed / "demo").mkdir(parents=True)
    (managed / "demo" / "rclone.conf").write_text("[store]\n", encoding="utf-8")
    flag = tmp_path / "flag"
    flag.write_text("active\n", encoding="utf-8")
    record = tmp_path / "record" / ".apply-record.json"
    common = {"path": str(record), "digest": "inputs-1"}
    recorded = run_module(tmp_path, state="recorded", files=[f"{managed}/**"], commands=[["cat", str(flag)]],
                          urls=[{"url": health_url, "status": [200]}], report=[{"name": "demo"}], **common)
    assert recorded["changed"] is False
    return {"tmp_path": tmp_path, "managed": managed, "flag": flag, "record": record, "common": common}


def check(node) -> dict:
    return run_module(node["tmp_path"], state="checked", **node["common"])


def test_record_is_readable_by_owner_only(node):
    assert node["record"].stat().st_mode & 0o077 == 0


def test_check_unchanged_node_converged(node):
    result = check(node)

    assert result["converged"] is True, result["reason"]
    assert result["report"] == [{"name": "demo"}]
    assert result["changed"] is False
    assert node["record"].exists()


@pytest.mark.parametrize("drift, reason", [
    ("edit", "a file that apply manages changed"),
    ("chmod", "a file that apply manages changed"),
    ("remove", "a file that apply manages changed"),
    ("add", "a file that apply manages changed"),
    ("command", "a unit, mount, firewall rule or published store changed"),
])
def test_check_drift_drops_record(node, drift, reason):
    config = node["managed"] / "demo" / "rclone.conf"
    if drift == "edit":
        config.write_text("[store]\nendpoint = http://127.0.0.1:1\n", encoding="utf-8")
    elif drift == "chmod":
        config.chmod(0o600)
    elif drift == "remove":
        config.unlink()
    elif drift == "add":
        (node["managed"] / "other").mkdir()
    else:
        node["flag"].write_text("failed\n", encoding="utf-8")

    result = check(node)

    assert result["converged"] is False
    assert result["reason"] == reason
    assert not node["record"].exists()
    assert check(node)["reason"] == "no record of a complete apply"


def test_check_changed_inputs(node):
    node["common"]["digest"] = "inputs-2"

    result = check(node)

    assert result["converged"] is False
    assert "changed since the last complete apply" in result["reason"]


def test_check_unresponsive_server(node, health_url):
    record = json.loads(node["record"].read_text(encoding="utf-8"))
    # The discard port: nothing listens on it on loopback.
    record["urls"] = [{"url": "http://127.0.0.1:9/health", "status": [200]}]
    node["record"].write_text(json.dumps(record), encoding="utf-8")

    result = check(node)

    assert result["converged"] is False
    assert result["reason"] == "no response from http://127.0.0.1:9/health"


def test_check_mode_keeps_the_record(node):
    node["flag"].write_text("failed\n", encoding="utf-8")

    result = run_module(node["tmp_path"], state="checked", _ansible_check_mode=True, **node["common"])

    assert result["converged"] is False
    assert node["record"].exists()


def test_record_units_per_runtime():
    replays = [
        {"name": "a", "runtime": "native", "server_unit": "p-a-server.service",
         "mounts": [{"unit": "p-a-metrics.service"}, {"unit": "p-a-artifacts.service"}]},
        {"name": "b", "runtime": "docker", "server_unit": "p-b-server.service",
         "mounts": [{"unit": "p-b-metrics.service"}]},
    ]

    assert mlflow_replay_record_units(replays, "p") == [
        "p-a-metrics.service", "p-a-artifacts.service", "p-b-metrics.service",
        "p-a-server.service", "p-b-stack.service", "nginx.service", "docker.service",
    ]
    assert "docker.service" not in mlflow_replay_record_units(replays[:1], "p")


def test_check_only_command_paths():
    replay = {"rclone_config": "/etc/r/demo/rclone.conf", "metrics": {"remote_path": "bucket"},
              "mirror_dir": "/var/lib/r/demo/mirror", "database": "/var/lib/r/demo/snapshot.db",
              "fingerprint_file": "/var/lib/r/demo/fingerprint"}

    command = mlflow_replay_check_only_command(replay, "/usr/local/libexec/import", "/opt/rclone")

    assert command[:3] == ["/usr/bin/python3", "/usr/local/libexec/import", "--check-only"]
    assert "--source=store:bucket" in command
    assert "--rclone-config=/etc/r/demo/rclone.conf" in command


def test_health_urls_server_and_guard():
    replay = {"server_port": 18000, "port": 8000}

    assert mlflow_replay_health_urls(replay, True) == [
        {"url": "http://127.0.0.1:18000/health", "status": [200]},
        {"url": "https://127.0.0.1:8000/health", "status": [200, 401]},
    ]


def test_digest_follows_vars_keys_code(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "roles" / "r").mkdir(parents=True)
    (project / "roles" / "r" / "main.yml").write_text("a: 1\n", encoding="utf-8")
    vars_file = tmp_path / "run-1" / "replay-vars.yml"
    vars_file.parent.mkdir()
    vars_file.write_text("port: 8000\n", encoding="utf-8")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-1")
    first = inputs_digest(project, [vars_file], "{}")

    # The same vars in another temporary directory: the same inputs.
    moved = tmp_path / "run-2" / "replay-vars.yml"
    moved.parent.mkdir()
    moved.write_text("port: 8000\n", encoding="utf-8")
    assert inputs_digest(project, [moved], "{}") == first

    moved.write_text("port: 8001\n", encoding="utf-8")
    assert inputs_digest(project, [moved], "{}") != first
    moved.write_text("port: 8000\n", encoding="utf-8")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-2")
    assert inputs_digest(project, [moved], "{}") != first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-1")
    (project / "roles" / "r" / "main.yml").write_text("a: 2\n", encoding="utf-8")
    assert inputs_digest(project, [moved], "{}") != first


def test_digest_follows_group_vars(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    inventory = tmp_path / "site" / "hosts.yml"
    (inventory.parent / "group_vars").mkdir(parents=True)
    inventory.write_text("replay_nodes:\n  hosts:\n    node1:\n", encoding="utf-8")
    group_vars = inventory.parent / "group_vars" / "replay_nodes.yml"
    group_vars.write_text("replay_guard_basic_auth_user: alice\n", encoding="utf-8")
    first = inputs_digest(project, [inventory], "{}")

    group_vars.write_text("replay_guard_basic_auth_user: bob\n", encoding="utf-8")

    assert inputs_digest(project, [inventory], "{}") != first
