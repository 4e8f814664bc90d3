"""The benchmark's bench: nodes, the moto S3 server, published stores and runner.py calls.

It reuses the test suite's wiring (tests/conftest.py), so the benchmark runs
on the same nodes, network and S3 server as the end-to-end tests.
"""

from __future__ import annotations

import json
import logging
import os
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from testbench.nodes import Bench, Node
from testbench.s3 import S3Server, start_s3_server
from testbench.store import StoreManifest, publish_generated_store
from tests import conftest

log = logging.getLogger(__name__)

# Metric points per metric key and run: three keys of 20 steps each.
METRIC_STEPS = 20


@dataclass
class PublishedStore:
    """A generated store of `runs` runs in one experiment, published to its own buckets."""

    runs: int
    manifest: StoreManifest
    objects: int

    @property
    def name(self) -> str:
        return f"runs{self.runs}"

    @property
    def metrics_bucket(self) -> str:
        return self.manifest.metrics_bucket

    @property
    def experiment_id(self) -> str:
        return self.manifest.experiment_by_name("generated").experiment_id

    def run_ids(self) -> list[str]:
        """Return the run ids, newest start time first, as the UI lists them."""
        runs = sorted(self.manifest.runs, key=lambda run: run.start_time, reverse=True)
        return [run.run_id for run in runs]


@dataclass
class ApplyResult:
    """One `runner.py apply --json` run: wall-clock seconds, CPU seconds and its JSON document.

    controller_cpu is the CPU time of runner.py and its children (Ansible, ssh)
    on this host. node_cpu is the CPU time spent inside the inventory's nodes.
    """

    seconds: float
    document: dict
    controller_cpu: float = 0.0
    node_cpu: float = 0.0

    def changed(self) -> int:
        return sum(host["changed"] for host in self.document.get("hosts", {}).values())


class BenchEnvironment:
    """The bench, S3 server and stores of one benchmark run. close() shuts all of them down."""

    def __init__(self, work_dir: Path):
        self.work_dir = work_dir
        self.bench = Bench(state_dir=conftest.BENCH_DIR, bridge=conftest.BENCH_BRIDGE,
                           subnet=f"{conftest.BENCH_PREFIX}.0/24")
        self.s3: S3Server | None = None

    def start(self) -> None:
        """Clear what an earlier run left, then start the S3 server in its namespace."""
        self.bench.shutdown()
        self.bench.create_netns_host(conftest.S3_NETNS, conftest.S3_ADDRESS)
        self.s3 = start_s3_server(conftest.S3_ADDRESS, conftest.S3_PORT, netns=conftest.S3_NETNS,
                                  log_path=self.work_dir / "moto.log")

    def close(self) -> None:
        if self.s3 is not None:
            self.s3.stop()
        self.bench.shutdown()

    def publish(self, runs: int) -> PublishedStore:
        """Log and publish a generated store of `runs` runs to buckets of its own."""
        started = time.monotonic()
        manifest = publish_generated_store(
            self.s3, f"bench-{runs}-mlruns", f"bench-{runs}-artifacts",
            self.work_dir / f"store-{runs}", runs=runs, metric_steps=METRIC_STEPS,
        )
        objects = len(self.s3.list_keys(manifest.metrics_bucket))
        log.info("published %d runs (%d objects) in %.0f s", runs, objects, time.monotonic() - started)
        return PublishedStore(runs=runs, manifest=manifest, objects=objects)

    def boot(self, names_and_numbers: list[tuple[str, int]]) -> list[Node]:
        return self.bench.boot([(name, conftest.node_address(number)) for name, number in names_and_numbers])

    def write_replay_files(self, label: str, nodes: list[Node], replays: list[dict],
                           workers: int | None = None) -> tuple[Path, Path]:
        """Write a vars file listing `replays` and an inventory of `nodes`, and return both paths."""
        directory = self.work_dir / label
        directory.mkdir(parents=True, exist_ok=True)
        settings = {"endpoint": self.s3.endpoint, "runtime": "native", "replays": replays}
        if workers is not None:
            settings["workers"] = workers
        vars_file = directory / "replay.yml"
        vars_file.write_text(yaml.safe_dump(settings))
        inventory = self.bench.write_inventory(directory / "inventory.ini", nodes)
        return vars_file, inventory

    def credentials_environment(self, extra_env: dict | None = None) -> dict[str, str]:
        """Return this process's environment with the S3 credentials and `extra_env` added."""
        environment = dict(os.environ)
        environment.pop("AWS_CA_BUNDLE", None)
        environment["AWS_ACCESS_KEY_ID"] = self.s3.access_key
        environment["AWS_SECRET_ACCESS_KEY"] = self.s3.secret_key
        environment.update(extra_env or {})
        return environment

    def runner(self, command: str, vars_file: Path, inventory: Path, *extra: str,
               timeout: float = 1800, extra_env: dict | None = None) -> ApplyResult:
        """Run `runner.py COMMAND --json` and time it. Raise RuntimeError unless it exits 0."""
        environment = self.credentials_environment(extra_env)
        nodes = _inventory_hosts(inventory)
        node_cpu_before = sum(self.node_cpu_seconds(name) for name in nodes)
        children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.monotonic()
        completed = subprocess.run(
            [sys.executable, str(conftest.PROJECT_ROOT / "runner.py"), command, "--json",
             "--inventory", str(inventory), "--vars", str(vars_file), *extra],
            cwd=conftest.PROJECT_ROOT, env=environment, capture_output=True, text=True,
            timeout=timeout, check=False,
        )
        seconds = time.monotonic() - started
        children_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        controller_cpu = (children_after.ru_utime + children_after.ru_stime
                          - children_before.ru_utime - children_before.ru_stime)
        node_cpu = sum(self.node_cpu_seconds(name) for name in nodes) - node_cpu_before
        try:
            document = json.loads(completed.stdout)
        except json.JSONDecodeError:
            document = {}
        if completed.returncode != 0:
            raise RuntimeError(
                f"runner.py {command} failed with exit code {completed.returncode}:\n"
                f"{completed.stdout[-3000:]}\n{completed.stderr[-3000:]}"
            )
        return ApplyResult(seconds=seconds, document=document, controller_cpu=controller_cpu, node_cpu=node_cpu)

    def node_cpu_seconds(self, name: str) -> float:
        """Return the CPU seconds that node `name` used since it booted, from its cgroup v2 cpu.stat."""
        stat = Path(f"/sys/fs/cgroup/unified/testbench.{self.bench.network.bridge}-{name}/cpu.stat")
        if not stat.exists():
            stat = Path(f"/sys/fs/cgroup/testbench.{self.bench.network.bridge}-{name}/cpu.stat")
        for line in stat.read_text().splitlines():
            key, value = line.split()
            if key == "usage_usec":
                return int(value) / 1e6
        raise RuntimeError(f"no usage_usec in {stat}")


def _inventory_hosts(inventory: Path) -> list[str]:
    """Return the host names of an INI inventory written by Bench.write_inventory."""
    hosts = []
    for line in inventory.read_text().splitlines():
        if line.startswith("["):
            if hosts or not line.endswith("_nodes]"):
                break
            continue
        if line.strip():
            hosts.append(line.split()[0])
    return hosts


def replay_entry(store: PublishedStore, port: int) -> dict:
    """Return the `replays:` entry that serves `store` on `port`."""
    return {
        "name": store.name,
        "metrics_container": store.metrics_bucket,
        "artifacts_container": store.manifest.artifacts_bucket,
        "port": port,
    }


def node_processes_of_units(node: Node, units: list[str]) -> list[dict]:
    """Return unit, PID, resident bytes and command line of every process in each unit's cgroup on `node`."""
    script = (
        'for unit in "$@"; do group=$(systemctl show -p ControlGroup --value "$unit"); '
        'for pid in $(cat "/sys/fs/cgroup$group/cgroup.procs" 2>/dev/null); do '
        "kb=$(awk '/^VmRSS:/ {print $2}' /proc/$pid/status 2>/dev/null); "
        "cmd=$(tr '\\0' ' ' < /proc/$pid/cmdline 2>/dev/null | cut -c1-120); "
        'echo "$unit $pid ${kb:-0} $cmd"; done; done'
    )
    processes = []
    for line in node.run(["bash", "-c", script, "rss", *units]).stdout.splitlines():
        unit, pid, kilobytes, *command = line.split(" ", 3)
        processes.append({"unit": unit, "pid": int(pid), "rss": int(kilobytes) * 1024,
                          "command": command[0].strip() if command else ""})
    return processes


def node_rss_of_units(node: Node, units: list[str]) -> dict[str, int]:
    """Return the summed resident set size in bytes of the processes of each unit on `node`."""
    sizes = {unit: 0 for unit in units}
    for process in node_processes_of_units(node, units):
        sizes[process["unit"]] += process["rss"]
    return sizes

