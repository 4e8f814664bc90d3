"""Import and refresh time of a snapshot, against a raw `rclone copy` plus a local migration.

Everything runs on the replay's node with the node's own rclone and MLflow,
in scratch directories under /var/tmp, so the replay's snapshot is untouched.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field

from testbench.nodes import Node
from testbench.s3 import S3Server

from benchmarks.contestants import RCLONE, REPLAY_VENV
from benchmarks.environment import PublishedStore

IMPORT_SCRIPT = "/usr/local/libexec/mlflow-replay/import-snapshot"
SCRATCH = "/var/tmp/bench-transfer"


@dataclass
class TransferResult:
    """Seconds per repetition of each measured operation for one store."""

    seconds: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, seconds: float) -> None:
        self.seconds.setdefault(name, []).append(seconds)

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])


def _timed(node: Node, command: str, timeout: float = 1800) -> float:
    started = time.monotonic()
    node.run(command, timeout=timeout)
    return time.monotonic() - started


def _import_command(replay: str, bucket: str, directory: str, transfers: int) -> str:
    return (
        f"{REPLAY_VENV}/bin/python {IMPORT_SCRIPT} --rclone={RCLONE} "
        f"--rclone-config=/etc/mlflow-replay/{replay}/rclone.conf --source=store:{bucket} "
        f"--mirror={directory}/mirror --database={directory}/snapshot.db "
        f"--fingerprint={directory}/source.fingerprint --mlflow={REPLAY_VENV}/bin/mlflow "
        f"--transfers={transfers} >/dev/null"
    )


def copy_variants(quick: bool) -> dict[str, str]:
    """Return rclone copy flag sets to compare, by label."""
    variants = {
        "--transfers 8": "--transfers 8 --checkers 16 --fast-list --use-server-modtime",
        "--transfers 16": "--transfers 16 --checkers 32 --fast-list --use-server-modtime",
        "--transfers 32": "--transfers 32 --checkers 64 --fast-list --use-server-modtime",
        "--transfers 16, no --fast-list": "--transfers 16 --checkers 32 --use-server-modtime",
    }
    if not quick:
        variants["--transfers 64"] = "--transfers 64 --checkers 128 --fast-list --use-server-modtime"
        variants["--transfers 16, no --use-server-modtime"] = "--transfers 16 --checkers 32 --fast-list"
    return variants


def measure_transfer(node: Node, s3: S3Server, store: PublishedStore, replay: str,
                     repetitions: int, quick: bool) -> TransferResult:
    """Time a cold import, a refresh after one new object, raw copies and a local migration."""
    result = TransferResult()
    bucket = store.metrics_bucket
    config = f"/etc/mlflow-replay/{replay}/rclone.conf"
    variants = copy_variants(quick)
    for repetition in range(repetitions):
        directory = f"{SCRATCH}/import"
        node.run(f"rm -rf {SCRATCH} && mkdir -p {directory}")
        result.add("import", _timed(node, _import_command(replay, bucket, directory, 16)))

        # One new tag file changes the listing, so the import syncs one object and migrates again.
        key = f"{store.experiment_id}/{store.run_ids()[0]}/tags/bench.refresh.{repetition}"
        s3.client().put_object(Bucket=bucket, Key=key, Body=b"refresh")
        try:
            result.add("refresh", _timed(node, _import_command(replay, bucket, directory, 16)))
        finally:
            s3.client().delete_object(Bucket=bucket, Key=key)

        for label, flags in variants.items():
            target = f"{SCRATCH}/raw"
            node.run(f"rm -rf {target}")
            result.add(f"rclone copy {label}",
                       _timed(node, f"{RCLONE} --config {config} copy {flags} store:{bucket} {target}"))

        node.run(f"rm -f {SCRATCH}/local.db")
        result.add("migrate-filestore", _timed(
            node, f"MLFLOW_DISABLE_TELEMETRY=true {REPLAY_VENV}/bin/mlflow migrate-filestore --no-progress "
                  f"--source {directory}/mirror --target sqlite:///{SCRATCH}/local.db >/dev/null"))
    node.run(f"rm -rf {SCRATCH}")
    return result
