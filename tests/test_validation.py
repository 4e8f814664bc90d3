"""Bad configurations are caught before anything on a node changes.

Runner-side cases call the command line in-process on a vars file and an
inventory that name an address with no node behind it: exit code 2 proves that
no playbook started. Node-side cases share one booted node, run a real
`apply`, expect exit code 1 with the preflight message, and compare the node's
file system before and after. The module ends with a valid replay that
preflight must not block, applied twice, and a teardown.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from mlflow_replay import cli
from testbench.s3 import start_s3_server
from tests.conftest import (
    ARTIFACTS_BUCKET,
    METRICS_BUCKET,
    PROJECT_ROOT,
    S3_ADDRESS,
    S3_NETNS,
    make_replay,
    node_address,
)

SECRET_KEY = "validation-secret-value"
ENDPOINT = f"http://{S3_ADDRESS}:9000"
BASE_SETTINGS = {
    "name": "demo",
    "metrics_container": METRICS_BUCKET,
    "artifacts_container": ARTIFACTS_BUCKET,
    "endpoint": ENDPOINT,
    "port": 8000,
    "runtime": "native",
}
REMOVE = object()

# (case id, changes to BASE_SETTINGS, expected fragment of the error message).
RUNNER_CASES = [
    ("name-number", {"name": 5}, "name: must be 1-32 lower-case letters"),
    ("name-empty", {"name": ""}, "name: must be 1-32 lower-case letters"),
    ("name-upper-case", {"name": "Demo"}, "(got 'Demo')"),
    ("metrics-empty", {"metrics_container": ""}, "metrics_container: must be a non-empty string"),
    ("metrics-number", {"metrics_container": 42}, "metrics_container: must be a non-empty string (got 42)"),
    ("metrics-missing", {"metrics_container": REMOVE}, "metrics_container: must be a non-empty string"),
    ("artifacts-bad-name", {"artifacts_container": "Bad_Bucket!"}, "is not a valid S3 bucket name"),
    ("s3-url-no-bucket", {"metrics_container": "s3://"}, "metrics_container: no container name found"),
    ("ftp-url", {"metrics_container": "ftp://host/mlruns"}, "metrics_container: unsupported URL"),
    ("s3-path-url-query", {"metrics_container": "https://store.example:7480/mlruns?x=1"},
     "takes no query string or fragment"),
    ("swift-url-fragment", {"metrics_container": "https://store.example:7480/swift/v1/AUTH_p/mlruns#top"},
     "takes no query string or fragment"),
    ("prefix-dot-dot", {"artifacts_container": "artifacts/../other"}, "'.' and '..' are not allowed"),
    ("endpoint-empty", {"endpoint": ""}, "endpoint: must be a non-empty URL"),
    ("endpoint-no-scheme", {"endpoint": "store.example:7480"}, "must start with http:// or https://"),
    ("endpoint-with-path", {"endpoint": "https://store.example:7480/mlruns"}, "without a path"),
    ("endpoint-bad-port", {"endpoint": "https://store.example:http"}, "endpoint: has an invalid port"),
    ("endpoint-missing", {"endpoint": REMOVE}, "endpoint: is missing"),
    ("site-unknown", {"site": "CHI@NOWHERE", "endpoint": REMOVE}, "site: is not a Chameleon site"),
    ("site-and-endpoint", {"site": "CHI@UC"}, "disagrees with site CHI@UC"),
    ("swift-url-other-endpoint",
     {"metrics_container": "https://chi.uc.chameleoncloud.org:7480/swift/v1/AUTH_p/mlruns"},
     "disagrees with the container URL's endpoint"),
    ("container-urls-two-endpoints",
     {"endpoint": REMOVE, "metrics_container": "https://one.example:7480/mlruns",
      "artifacts_container": "https://two.example:7480/artifacts"},
     "the two container URLs name different endpoints"),
    ("port-zero", {"port": 0}, "port: must be an integer from 1 to 65535 (got 0)"),
    ("port-too-large", {"port": 70000}, "(got 70000)"),
    ("port-string", {"port": "8000"}, "port: must be an integer from 1 to 65535 (got '8000')"),
    ("port-boolean", {"port": True}, "port: must be an integer from 1 to 65535 (got True)"),
    ("runtime-unknown", {"runtime": "podman"}, "runtime: is not supported"),
    ("anonymous-string", {"anonymous": "yes"}, "anonymous: must be true or false"),
    ("workers-zero", {"workers": 0}, "workers: must be an integer from 1 to 16"),
    ("unknown-key-typo", {"metric_container": "mlruns"}, "Did you mean 'metrics_container'?"),
]


def _settings(changes: dict) -> dict:
    settings = dict(BASE_SETTINGS)
    for key, value in changes.items():
        if value is REMOVE:
            settings.pop(key, None)
        else:
            settings[key] = value
    return settings


@pytest.fixture
def offline_files(tmp_path):
    """A valid vars file and an inventory whose one host does not exist."""
    vars_file = tmp_path / "replay.yml"
    vars_file.write_text(yaml.safe_dump(BASE_SETTINGS))
    inventory = tmp_path / "inventory.ini"
    inventory.write_text(f"[replay_nodes]\nabsent ansible_host={node_address(250)}\n")
    return vars_file, inventory


@pytest.fixture
def credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "validation-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)


def run_cli(capsys, vars_file: Path, inventory: Path) -> tuple[int, str]:
    code = cli.main(["apply", "--vars", str(vars_file), "--inventory", str(inventory)])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def assert_rejected(code: int, output: str, fragment: str) -> None:
    assert code == cli.EXIT_INVALID_CONFIG, output
    assert "invalid configuration:" in output
    assert fragment in output
    assert SECRET_KEY not in output
    # A playbook that started would have printed a task or a recap.
    assert "TASK " not in output
    assert "PLAY RECAP" not in output


@pytest.mark.parametrize(("changes", "fragment"), [case[1:] for case in RUNNER_CASES],
                         ids=[case[0] for case in RUNNER_CASES])
def test_invalid_setting_rejected(changes, fragment, offline_files, credentials, capsys):
    vars_file, inventory = offline_files
    vars_file.write_text(yaml.safe_dump(_settings(changes)))

    code, output = run_cli(capsys, vars_file, inventory)

    assert_rejected(code, output, fragment)


@pytest.mark.parametrize(("text", "fragment"), [
    ("name: [demo\n", "vars file: is not valid YAML at line 2"),
    ("- name: demo\n", "vars file: must be a mapping of keys to values"),
], ids=["not-yaml", "list"])
def test_invalid_vars_file_rejected(text, fragment, offline_files, credentials, capsys):
    vars_file, inventory = offline_files
    vars_file.write_text(text)

    code, output = run_cli(capsys, vars_file, inventory)

    assert_rejected(code, output, fragment)


@pytest.mark.parametrize(("name", "text", "fragment"), [
    ("inventory.yml", "replay_nodes:\n  hosts: [node1\n", "is not a valid YAML or INI inventory"),
    ("inventory.ini", "[other_nodes]\nnode1 ansible_host=10.0.0.1\n", "has no host in the group replay_nodes"),
    ("inventory.yml", "replay_nodes:\n  hosts: {}\n", "has no host in the group replay_nodes"),
], ids=["yaml-syntax", "ini-no-group", "yaml-empty-group"])
def test_invalid_inventory_rejected(name, text, fragment, offline_files, credentials, capsys, tmp_path):
    vars_file, _ = offline_files
    inventory = tmp_path / name
    inventory.write_text(text)

    code, output = run_cli(capsys, vars_file, inventory)

    assert_rejected(code, output, fragment)
    assert f"(got '{inventory}')" in output


def test_missing_inventory_rejected(offline_files, credentials, capsys, tmp_path):
    vars_file, _ = offline_files

    code, output = run_cli(capsys, vars_file, tmp_path / "missing.ini")

    assert_rejected(code, output, "--inventory: is not a file")


def test_missing_credentials_exit_two(offline_files):
    """The real command line, as a user runs it: exit status 2 and no traceback."""
    vars_file, inventory = offline_files
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}

    completed = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "runner.py"), "apply", "--vars", str(vars_file),
         "--inventory", str(inventory)],
        cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=120, check=False,
    )
    output = completed.stdout + completed.stderr

    assert completed.returncode == 2, output
    assert "AWS_ACCESS_KEY_ID: is not set" in output
    assert "Traceback" not in output


# --- Node-side preflight ----------------------------------------------------

NODE = ("pfnode", node_address(26))
AUTH_PORT = 9001
HELD_PORT = 8123
NESTED_BUCKET = "nested-mlruns"
EMPTY_BUCKET = "empty-mlruns"
# Everything apply creates on a node; none may appear after a failed preflight.
NODE_STATE_COMMAND = (
    "ls -d /etc/mlflow-replay /opt/mlflow-replay /srv/mlflow-replay /var/lib/mlflow-replay"
    " /var/cache/mlflow-replay /usr/local/libexec/mlflow-replay /etc/systemd/system/mlflow-replay-* 2>/dev/null;"
    " md5sum /var/log/apt/history.log /var/lib/dpkg/status 2>/dev/null; ls /tmp"
)


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def authenticating_s3(s3, tmp_path_factory):
    """A second moto server that authenticates every request, so it rejects the bench keys."""
    log_path = tmp_path_factory.mktemp("auth-s3") / "moto.log"
    server = start_s3_server(S3_ADDRESS, AUTH_PORT, netns=S3_NETNS, log_path=log_path,
                             extra_env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def extra_buckets(s3, published_store):
    """An empty bucket, and the store's meta.yaml files under 'some/prefix/' in another bucket."""
    client = s3.client()
    s3.create_bucket(EMPTY_BUCKET)
    s3.create_bucket(NESTED_BUCKET)
    for key in s3.list_keys(METRICS_BUCKET):
        if key.endswith("meta.yaml"):
            client.copy_object(Bucket=NESTED_BUCKET, Key=f"some/prefix/{key}",
                               CopySource={"Bucket": METRICS_BUCKET, "Key": key})


@pytest.fixture(scope="module")
def node_state(node):
    """The node's state before the first apply."""
    return node.run(NODE_STATE_COMMAND, check=False).stdout


NODE_CASES = [
    ("endpoint-closed-port", {"endpoint": f"http://{S3_ADDRESS}:9999"},
     f"endpoint: connection to http://{S3_ADDRESS}:9999 ({S3_ADDRESS} port 9999) refused"),
    ("endpoint-not-resolving", {"endpoint": "http://no-such-store.invalid:9000"},
     "endpoint: host 'no-such-store.invalid' of http://no-such-store.invalid:9000 does not resolve"),
    ("endpoint-no-host", {"endpoint": f"http://{node_address(250)}:9000"}, "is unreachable from this node"),
    ("credentials-wrong", {"endpoint": f"http://{S3_ADDRESS}:{AUTH_PORT}"},
     "AWS_ACCESS_KEY_ID: credentials rejected by"),
    ("metrics-not-found", {"metrics_container": "no-such-mlruns"},
     "metrics_container: container 'no-such-mlruns' not found"),
    ("artifacts-not-found", {"artifacts_container": "no-such-artifacts"},
     "artifacts_container: container 'no-such-artifacts' not found"),
    ("metrics-is-artifacts", {"metrics_container": ARTIFACTS_BUCKET}, "looks like an artifacts container"),
    ("metrics-empty", {"metrics_container": EMPTY_BUCKET}, f"container '{EMPTY_BUCKET}' is not an MLflow file store: it is empty"),
    ("metrics-prefix-missing", {"metrics_container": NESTED_BUCKET}, "use the prefix 'some/prefix'"),
    ("metrics-prefix-partial", {"metrics_container": f"{NESTED_BUCKET}/some"}, "use the prefix 'some/prefix'"),
    ("port-held", {"port": HELD_PORT}, f"port: {HELD_PORT} is already in use on this node by python3 (pid"),
]


@pytest.fixture(scope="module")
def port_holder(node):
    """A process that listens on HELD_PORT on the node, as a transient systemd unit."""
    node.run(f"systemd-run --unit=preflight-port-holder /usr/bin/python3 -m http.server {HELD_PORT}")
    node.run(f"for i in $(seq 50); do grep -qi ':{HELD_PORT:04X} .* 0A ' /proc/net/tcp* && exit 0; sleep 0.1; done;"
             " exit 1")
    yield
    node.run("systemctl stop preflight-port-holder.service", check=False)


@pytest.mark.bench
@pytest.mark.parametrize(("changes", "fragment"), [case[1:] for case in NODE_CASES],
                         ids=[case[0] for case in NODE_CASES])
def test_preflight_fails_host_unchanged(changes, fragment, tmp_path, bench, node, s3, authenticating_s3,
                                        extra_buckets, port_holder, node_state):
    replay = make_replay(tmp_path, bench, [node], s3, **changes)

    result = replay.runner("apply")

    assert result.returncode == 1, result.output
    assert result.recap(node.name)["failed"] == 1
    assert result.recap(node.name)["changed"] == 0
    assert fragment in result.output
    assert "Preflight failed, nothing on this node was changed" in result.output
    assert s3.secret_key not in result.output
    assert "Traceback" not in result.output
    assert node.run(NODE_STATE_COMMAND, check=False).stdout == node_state


@pytest.mark.bench
def test_preflight_passes_valid_replay(tmp_path, bench, node, s3, published_store, node_state):
    replay = make_replay(tmp_path, bench, [node], s3)

    first = replay.runner("apply")
    second = replay.runner("apply")
    teardown = replay.runner("teardown")

    assert first.returncode == 0, first.output
    assert second.returncode == 0, second.output
    assert second.recap(node.name)["changed"] == 0
    assert "Preflight failed" not in first.output + second.output
    assert teardown.returncode == 0, teardown.output
