"""Fixtures shared by the end-to-end tests: nodes, S3 server, published store.

The bench (systemd-nspawn nodes on a private bridge, moto S3 in a network
namespace) is expensive, so it is booted once per session and shared.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from testbench.nodes import Bench, Node
from testbench.s3 import S3Server, start_s3_server
from testbench.store import StoreManifest, publish_sample_store
from testbench.wheelhouse import ensure_wheelhouse

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# MLFLOW_REPLAY_BENCH_INDEX (0-9) selects a bench of its own: bridge, subnet,
# state directory and namespace names, so that two test runs can share a host.
BENCH_INDEX = int(os.environ.get("MLFLOW_REPLAY_BENCH_INDEX", "0"))
BENCH_DIR = Path(f"/var/lib/mlflow-replay-bench{BENCH_INDEX or ''}")
BENCH_BRIDGE = f"mlrbr{BENCH_INDEX}"
BENCH_PREFIX = f"10.213.{BENCH_INDEX}"
S3_NETNS = f"mlrb{BENCH_INDEX}-s3"
S3_ADDRESS = f"{BENCH_PREFIX}.2"
S3_PORT = 9000
METRICS_BUCKET = "published-mlruns"
ARTIFACTS_BUCKET = "published-artifacts"
RECAP_LINE = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


@pytest.fixture(scope="session")
def bench():
    """The session's node bench; shuts down every node and the network at the end."""
    instance = Bench(state_dir=BENCH_DIR, bridge=BENCH_BRIDGE, subnet=f"{BENCH_PREFIX}.0/24")
    instance.shutdown()  # Clear what a crashed earlier session left behind.
    ensure_wheelhouse(instance.pip_cache_dir)
    try:
        yield instance
    finally:
        instance.shutdown()


@pytest.fixture(scope="session")
def s3(bench, tmp_path_factory) -> S3Server:
    """A moto S3 server inside its own network namespace on the bench bridge."""
    bench.create_netns_host(S3_NETNS, S3_ADDRESS)
    log_path = tmp_path_factory.mktemp("s3") / "moto.log"
    server = start_s3_server(S3_ADDRESS, S3_PORT, netns=S3_NETNS, log_path=log_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def published_store(s3, tmp_path_factory) -> StoreManifest:
    """The sample store, logged by a real MLflow server and published to S3."""
    work_dir = tmp_path_factory.mktemp("store")
    return publish_sample_store(s3, METRICS_BUCKET, ARTIFACTS_BUCKET, work_dir)


@dataclass
class RunnerResult:
    """A finished `runner.py` invocation."""

    returncode: int
    output: str

    def recap(self, host: str) -> dict[str, int]:
        """Return the recap counters of `host`; fail the test when there is none."""
        for match in RECAP_LINE.finditer(self.output):
            if match["host"] == host:
                return {key: int(value) for key, value in match.groupdict().items() if key != "host"}
        raise AssertionError(f"no recap line for {host} in:\n{self.output[-3000:]}")

    def changed_tasks(self, host: str) -> set[str]:
        """Return the names of the tasks that reported a change on `host`."""
        changed, task = set(), None
        for line in self.output.splitlines():
            if line.startswith("TASK "):
                task = line[len("TASK "):]
            elif line.strip() == f"{host}: changed" and task:
                changed.add(task)
        return changed


@dataclass
class Replay:
    """A vars file and inventory for one test, and a way to run runner.py on them."""

    vars_file: Path
    inventory: Path
    s3: S3Server

    def settings(self) -> dict:
        return yaml.safe_load(self.vars_file.read_text())

    def write_settings(self, settings: dict) -> None:
        self.vars_file.write_text(yaml.safe_dump(settings))

    def runner(self, *arguments: str, timeout: float = 1200, env: dict | None = None) -> RunnerResult:
        """Run `python runner.py ARGUMENTS` with this replay's files and credentials."""
        environment = dict(os.environ)
        environment.pop("AWS_CA_BUNDLE", None)
        environment["AWS_ACCESS_KEY_ID"] = self.s3.access_key
        environment["AWS_SECRET_ACCESS_KEY"] = self.s3.secret_key
        environment.update(env or {})
        command, *rest = arguments
        completed = subprocess.run(
            [sys.executable, str(PROJECT_ROOT / "runner.py"), command,
             "--inventory", str(self.inventory), "--vars", str(self.vars_file), *rest],
            cwd=PROJECT_ROOT, env=environment, capture_output=True, text=True, timeout=timeout, check=False,
        )
        output = completed.stdout + completed.stderr
        print(output)
        return RunnerResult(completed.returncode, output)


def node_address(host_number: int) -> str:
    """Return the bench address of node number `host_number` (11 and up).

    Nodes stay up for the whole session, so each test module uses numbers of
    its own. Native uses 11, drift 12, list 13, check mode 14, store refresh 15, many nodes
    21-23, runner 25 (and 99, never booted), preflight 26 (and 250), docker
    31 and 40, guard 41, apply faults 57, native faults 55, docker faults 56.
    """
    return f"{BENCH_PREFIX}.{host_number}"


def make_replay(tmp_path: Path, bench: Bench, nodes: list[Node], s3: S3Server, **overrides) -> Replay:
    """Write a vars file for the published store and an inventory of `nodes`."""
    settings = {
        "name": "demo",
        "metrics_container": METRICS_BUCKET,
        "artifacts_container": ARTIFACTS_BUCKET,
        "endpoint": s3.endpoint,
        "port": 8000,
        "runtime": "native",
        **overrides,
    }
    vars_file = tmp_path / "replay.yml"
    vars_file.write_text(yaml.safe_dump(settings))
    inventory = bench.write_inventory(tmp_path / "inventory.ini", nodes)
    return Replay(vars_file=vars_file, inventory=inventory, s3=s3)
