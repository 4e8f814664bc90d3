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

import time

from testbench.nodes import Node

SEED_MLFLOW_VERSION = "3.0.0"
SEED_VENV = f"/opt/bench-seed/mlflow-{SEED_MLFLOW_VERSION}"
REPLAY_VENV = "/opt/mlflow-replay/mlflow-3.17.2"
RCLONE = "/opt/mlflow-replay/rclone-1.75.2/bin/rclone"
SERVER_ENVIRONMENT = ("MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false", "MLFLOW_DISABLE_TELEMETRY=true")


def install_seed_mlflow(node: Node) -> None:
    """Install MLflow 3.0.0 in a virtualenv of its own on the node, unless it is there."""
    node.run(
        f"test -x {SEED_VENV}/bin/mlflow || "
        f"(python3 -m venv {SEED_VENV} && {SEED_VENV}/bin/pip install --quiet mlflow=={SEED_MLFLOW_VERSION})",
        timeout=900,
    )


def _systemd_run(node: Node, unit: str, command: str, service_type: str = "exec") -> None:
    environment = " ".join(f"--setenv={item}" for item in SERVER_ENVIRONMENT)
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


def start_sqlite(node: Node, replay: str, port: int, workers: int) -> str:
    """Serve a copy of the replay's snapshot with its MLflow on 127.0.0.1:PORT. Return the unit."""
    unit = f"bench-sqlite-{replay}"
    database = f"/var/tmp/bench-sqlite-{replay}.db"
    node.run(f"cp /var/lib/mlflow-replay/{replay}/snapshot.db {database}")
    _systemd_run(
        node, unit,
        f"{REPLAY_VENV}/bin/mlflow server --backend-store-uri sqlite:///{database} --serve-artifacts "
        f"--artifacts-destination /srv/mlflow-replay/{replay}/artifacts --host 127.0.0.1 --port {port} "
        f"--workers {workers}",
    )
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
