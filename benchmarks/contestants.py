"""Start the servers that the replay is compared with, on the replay's own node.

- `sqlite`: the replay's MLflow on a plain copy of its snapshot, no guard in
  front. The lower bound for the replay's latency.
- `seed`: the design the replay replaces. MLflow 3.0.0, the release that
  design ran on, serves the file store straight from an rclone mount with
  `--vfs-cache-mode writes`. Later releases cannot stand in for it: 3.8 and
  later return 404 for runs whose empty `artifacts/` directory the upload
  dropped, and 3.13 and later reject file stores.

Every process runs in a transient systemd unit on the node, named `bench-*`,
so `stop_units` removes it.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import jinja2
import yaml

from testbench.nodes import Node

SEED_MLFLOW_VERSION = "3.0.0"
SEED_VENV = f"/opt/bench-seed/mlflow-{SEED_MLFLOW_VERSION}"
REPLAY_VENV = "/opt/mlflow-replay/mlflow-3.17.2"
RCLONE = "/opt/mlflow-replay/rclone-1.75.2/bin/rclone"
SERVER_ENVIRONMENT = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", "MLFLOW_DISABLE_TELEMETRY=true")
ROLE_VARS = Path(__file__).resolve().parent.parent / "roles/mlflow_replay/vars/main.yml"
SERVER_APP = yaml.safe_load(ROLE_VARS.read_text())["mlflow_replay_server_app"]


def install_seed_mlflow(node: Node) -> None:
    """Install MLflow 3.0.0 in a virtualenv of its own on the node, unless it is there."""
    node.run(
        f"test -x {SEED_VENV}/bin/mlflow || "
        f"(python3 -m venv {SEED_VENV} && {SEED_VENV}/bin/pip install --quiet mlflow=={SEED_MLFLOW_VERSION})",
        timeout=900,
    )


def replay_server_environment(database: str, artifacts: str) -> dict[str, str]:
    """Return the replay's server variables (roles/mlflow_replay/vars/main.yml) for one database."""
    values = yaml.safe_load(ROLE_VARS.read_text())["mlflow_replay_server_environment"]
    context = {"item": {"database": database, "artifacts_mount": artifacts},
               "replay_server_allowed_hosts": ["*"], "replay_server_cors_allowed_origins": ["*"]}
    return {name: jinja2.Template(str(value)).render(context) for name, value in values.items()}


def _systemd_run(node: Node, unit: str, command: str, settings: dict[str, str] | None = None,
                 service_type: str = "exec") -> None:
    variables = [*SERVER_ENVIRONMENT, *(f"{name}={value}" for name, value in (settings or {}).items())]
    environment = " ".join(shlex.quote(f"--setenv={item}") for item in variables)
    node.run(f"systemd-run --quiet --unit={unit} --property=Type={service_type} "
             f"--working-directory=/tmp {environment} {command}")


def wait_healthy(node: Node, port: int, timeout: float = 180) -> None:
    """Wait until http://127.0.0.1:PORT/health on the node returns 200; raise RuntimeError after timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        probe = node.run(["python3", "-c", "import sys, urllib.request; "
                          f"urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=5)"],
                         check=False)
        if probe.returncode == 0:
            return
        time.sleep(1)
    raise RuntimeError(f"no server responded on port {port} of node {node.name} within {timeout:.0f} s")


def start_sqlite(node: Node, replay: str, port: int, workers: int, launcher: str = "uvicorn") -> str:
    """Serve a copy of the replay's snapshot with its MLflow on 127.0.0.1:PORT. Return the unit.

    `launcher` "uvicorn" starts the server as the replay does (uvicorn with
    the settings of `mlflow_replay_server_environment`). "mlflow server"
    starts it with the `mlflow server` command, whose parent process stays
    alive beside uvicorn.
    """
    unit = f"bench-sqlite-{replay}"
    database = f"/var/tmp/bench-sqlite-{replay}.db"
    artifacts = f"/srv/mlflow-replay/{replay}/artifacts"
    node.run(f"cp /var/lib/mlflow-replay/{replay}/snapshot.db {database}")
    if launcher == "uvicorn":
        settings = replay_server_environment(database, artifacts)
        # A plain copy: the lower bound opens it without immutable=1.
        for name in ("_MLFLOW_SERVER_FILE_STORE", "_MLFLOW_SERVER_REGISTRY_STORE"):
            settings[name] = f"sqlite:///{database}"
        _systemd_run(node, unit, f"{REPLAY_VENV}/bin/python -m uvicorn --host 127.0.0.1 --port {port} "
                     f"--workers {workers} {SERVER_APP}", settings)
    elif launcher == "mlflow server":
        _systemd_run(
            node, unit,
            f"{REPLAY_VENV}/bin/mlflow server --backend-store-uri sqlite:///{database} --serve-artifacts "
            f"--artifacts-destination {artifacts} --host 127.0.0.1 --port {port} --workers {workers}",
        )
    else:
        raise ValueError(f"unknown launcher {launcher!r}: use 'uvicorn' or 'mlflow server'")
    wait_healthy(node, port)
    return unit


def start_seed(node: Node, replay: str, metrics_bucket: str, artifacts_bucket: str, port: int,
               worker_timeout: int) -> list[str]:
    """Mount both buckets with the seed's rclone flags and serve them with MLflow 3.0.0. Return the units.

    The mounts get a fresh VFS cache, so the first request is a cold one. One
    gunicorn worker with a worker timeout of `worker_timeout` seconds: the
    seed's own 30 s timeout turns a slow page into HTTP 500 instead of a time.
    """
    units = []
    for kind, bucket in (("metrics", metrics_bucket), ("artifacts", artifacts_bucket)):
        unit = f"bench-seed-{replay}-{kind}"
        path = f"/srv/bench-seed/{replay}/{kind}"
        cache = f"/var/cache/bench-seed/{replay}/{kind}"
        node.run(f"rm -rf {cache} && mkdir -p {path} {cache}")
        _systemd_run(
            node, unit,
            f"{RCLONE} mount store:{bucket} {path} --config /etc/mlflow-replay/{replay}/rclone.conf "
            f"--vfs-cache-mode writes --cache-dir {cache}",
            service_type="simple",
        )
        units.append(unit)
    _wait_mounted(node, f"/srv/bench-seed/{replay}/metrics")
    unit = f"bench-seed-{replay}-server"
    _systemd_run(
        node, unit,
        f"{SEED_VENV}/bin/mlflow server --backend-store-uri /srv/bench-seed/{replay}/metrics --serve-artifacts "
        f"--artifacts-destination /srv/bench-seed/{replay}/artifacts --host 127.0.0.1 --port {port} "
        f"--workers 1 --gunicorn-opts '--timeout {worker_timeout}'",
    )
    units.append(unit)
    wait_healthy(node, port)
    return units


def _wait_mounted(node: Node, path: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.run(f"mountpoint -q {path}", check=False).returncode == 0:
            return
        time.sleep(0.5)
    raise RuntimeError(f"rclone did not mount {path} on node {node.name} within {timeout:.0f} s")


def stop_units(node: Node, units: list[str]) -> None:
    """Stop transient units started by this module; units already gone are skipped."""
    for unit in reversed(units):
        node.run(f"systemctl stop {unit}", check=False, timeout=120)
        node.run(f"systemctl reset-failed {unit}", check=False)
