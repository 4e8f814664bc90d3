"""Write MLflow stores the way researchers publish them, and record what they contain.

A real `mlflow server` (the version installed next to this Python) runs on
127.0.0.1 with a file store in `<work_dir>/mlruns` and proxies artifacts into
the artifacts bucket. The MLflow client logs experiments and runs through it.
Before the server stops, the client reads everything back into a
StoreManifest, which the viewer under test must reproduce. `rclone copy` then
publishes `mlruns` to the metrics bucket.

Bucket layouts, as observed with MLflow 3.17.2 and moto 5.2.6:

- Metrics bucket, under the optional prefix: the `mlruns` tree with files
  only. That is `<experiment_id>/meta.yaml`, `<experiment_id>/tags/<key>`,
  `<experiment_id>/<run_id>/meta.yaml` and
  `<experiment_id>/<run_id>/{params,tags,metrics}/<key>`. rclone copies no
  empty directories, so `.trash/`, `models/`, every run's empty `artifacts/`
  and the empty `params/` or `metrics/` of a run without any are absent.
  Run and experiment meta.yaml files store `artifact_uri` and
  `artifact_location` as `mlflow-artifacts:/...` URIs.
- Artifacts bucket: `<experiment_id>/<run_id>/artifacts/<artifact path>`,
  which is the path of the run's `mlflow-artifacts:/` URI below the
  `--artifacts-destination` root.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from unittest import mock

# `import mlflow` starts MLflow's telemetry client unless this is set first,
# and the bench must send no traffic off this machine.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import mlflow  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import Metric, Param, ViewType  # noqa: E402

from testbench.s3 import (  # noqa: E402
    S3Server,
    without_proxy_variables,
    rclone_copy,
    read_log_tail,
    s3_remote_path,
    stop_process,
)

logger = logging.getLogger(__name__)

MLFLOW_STARTUP_TIMEOUT_SECONDS = 120.0
MANIFEST_FILE_NAME = "manifest.json"

# Fixed epoch milliseconds for run and metric timestamps, so that the store's
# content does not depend on when it was written. Experiment creation times
# and all ids are still chosen by MLflow.
BASE_TIMESTAMP_MS = 1_700_000_000_000


# ---------------------------------------------------------------------------
# Manifest


@dataclass
class ExperimentRecord:
    """An experiment as the source server returned it."""

    experiment_id: str
    name: str
    lifecycle_stage: str
    tags: dict[str, str]
    artifact_location: str


@dataclass
class ArtifactRecord:
    """SHA-256 (hex) and size in bytes of one artifact object."""

    sha256: str
    size: int


@dataclass
class RunRecord:
    """A run as the source server returned it, with its artifacts read from the bucket.

    metrics maps each key to its full history as (step, value, timestamp)
    tuples, sorted. Timestamps are epoch milliseconds. artifacts maps each path
    relative to the run's artifact root to its object's digest.
    """

    run_id: str
    experiment_id: str
    name: str
    status: str
    lifecycle_stage: str
    start_time: int | None
    end_time: int | None
    artifact_uri: str
    params: dict[str, str]
    tags: dict[str, str]
    metrics: dict[str, list[tuple[int, float, int]]]
    artifacts: dict[str, ArtifactRecord] = field(default_factory=dict)


def _encode_float(value: float) -> float | str:
    # JSON has no NaN or infinity, so those travel as the strings Python's float() parses.
    return value if math.isfinite(value) else repr(value)


def _decode_float(value: float | str) -> float:
    return float(value)


@dataclass
class StoreManifest:
    """Everything a faithful viewer must show for one published store.

    experiments includes Default. runs includes deleted runs. prefix is the
    key prefix of the store in the metrics bucket, without slashes.
    """

    metrics_bucket: str
    artifacts_bucket: str
    prefix: str
    mlflow_version: str
    experiments: list[ExperimentRecord]
    runs: list[RunRecord]

    def run_by_name(self, name: str) -> RunRecord:
        """Return the only run called name, or raise KeyError."""
        matches = [run for run in self.runs if run.name == name]
        if len(matches) != 1:
            raise KeyError(f"expected exactly one run named {name!r}, found {len(matches)}")
        return matches[0]

    def experiment_by_name(self, name: str) -> ExperimentRecord:
        """Return the experiment called name, or raise KeyError."""
        for experiment in self.experiments:
            if experiment.name == name:
                return experiment
        raise KeyError(f"no experiment named {name!r}")

    def to_json(self) -> str:
        data = asdict(self)
        for run in data["runs"]:
            run["metrics"] = {
                key: [[step, _encode_float(value), timestamp] for step, value, timestamp in history]
                for key, history in run["metrics"].items()
            }
        return json.dumps(data, indent=2, sort_keys=True, allow_nan=False, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str) -> StoreManifest:
        data = json.loads(text)
        experiments = [ExperimentRecord(**item) for item in data.pop("experiments")]
        runs = []
        for item in data.pop("runs"):
            item["metrics"] = {
                key: [(step, _decode_float(value), timestamp) for step, value, timestamp in history]
                for key, history in item["metrics"].items()
            }
            item["artifacts"] = {
                path: ArtifactRecord(**record) for path, record in item["artifacts"].items()
            }
            runs.append(RunRecord(**item))
        return cls(experiments=experiments, runs=runs, **data)

    def write(self, path: Path) -> None:
        Path(path).write_text(self.to_json() + "\n", encoding="utf-8")

    @classmethod
    def read(cls, path: Path) -> StoreManifest:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------
# MLflow server


@dataclass
class MlflowServer:
    """A running `mlflow server` process and the URL its clients use."""

    url: str
    process: subprocess.Popen
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """Stop the server and its uvicorn worker by PID and wait for them to exit."""
        stop_process(self.process)


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on host a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def mlflow_executable() -> Path:
    """Return the `mlflow` script installed next to the running Python."""
    return Path(sys.executable).parent / "mlflow"


def mlflow_server_environment(s3: S3Server) -> dict[str, str]:
    """Return the environment for an MLflow process that reads and writes artifacts in s3."""
    env = without_proxy_variables(dict(os.environ))
    env.update(s3.aws_environment())
    env.update(
        {
            # MLflow 3.13 and later reject file stores unless this is set.
            "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            # With a database store, such as the SQLite viewer, the server would
            # otherwise also start a job runner process.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
    )
    return env


def start_mlflow_server(
    backend_store_uri: str,
    artifacts_destination: str,
    s3: S3Server,
    log_path: Path,
    host: str = "127.0.0.1",
    port: int | None = None,
    cwd: Path | None = None,
    timeout: float = MLFLOW_STARTUP_TIMEOUT_SECONDS,
) -> MlflowServer:
    """Start `mlflow server --serve-artifacts` with one worker and wait until /health responds.

    port None picks a free port. Raises RuntimeError with the log tail when the
    server exits or does not respond within timeout seconds, after stopping it.
    """
    if port is None:
        port = find_free_port(host)
    command = [
        str(mlflow_executable()),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        artifacts_destination,
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    log_path = Path(log_path)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=mlflow_server_environment(s3),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = MlflowServer(url=f"http://{host}:{port}", process=process, log_path=log_path)

    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(
                f"mlflow server for {backend_store_uri} exited with status {process.returncode} "
                f"before responding on {server.url}. Log tail of {log_path}:\n"
                f"{read_log_tail(log_path)}"
            )
        try:
            with opener.open(f"{server.url}/health", timeout=2) as response:
                if response.status == 200:
                    return server
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(
                f"mlflow server for {backend_store_uri} did not respond on {server.url} within "
                f"{timeout:.0f} s and was stopped. Log tail of {log_path}:\n"
                f"{read_log_tail(log_path)}"
            )
        time.sleep(0.3)


def _start_source_server(s3: S3Server, artifacts_bucket: str, work_dir: Path) -> MlflowServer:
    return start_mlflow_server(
        backend_store_uri=f"file://{work_dir / 'mlruns'}",
        artifacts_destination=f"s3://{artifacts_bucket}",
        s3=s3,
        log_path=work_dir / "source-server.log",
        cwd=work_dir,
    )


# ---------------------------------------------------------------------------
# Sample content


def _deterministic_bytes(seed: str, size: int) -> bytes:
    """Return size pseudo-random bytes that depend only on seed."""
    chunks = []
    counter = 0
    while sum(len(chunk) for chunk in chunks) < size:
        chunks.append(hashlib.sha256(f"{seed}:{counter}".encode()).digest())
        counter += 1
    return b"".join(chunks)[:size]


def _write_artifact_tree(root: Path, files: dict[str, bytes]) -> Path:
    for relative_path, content in files.items():
        path = root / relative_path
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    return root


class _SampleLogger:
    """Log the sample runs with fixed timestamps through one MlflowClient."""

    def __init__(self, client: MlflowClient, artifact_sources: Path):
        self.client = client
        self.artifact_sources = artifact_sources
        self.run_count = 0

    def start_run(self, experiment_id: str, name: str, tags: dict[str, str] | None = None) -> str:
        self.run_count += 1
        start_time = BASE_TIMESTAMP_MS + self.run_count * 3_600_000
        run = self.client.create_run(
            experiment_id, start_time=start_time, tags=tags or {}, run_name=name
        )
        return run.info.run_id

    def run_time(self, offset_ms: int) -> int:
        """Return the timestamp offset_ms after the start of the run started last."""
        return BASE_TIMESTAMP_MS + self.run_count * 3_600_000 + offset_ms

    def log_params(self, run_id: str, params: dict[str, str]) -> None:
        self.client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])

    def log_curves(self, run_id: str, curves: dict[str, list[float]]) -> None:
        """Log each curve's values at steps 0, 1, ... one second apart."""
        metrics = [
            Metric(key, value, self.run_time(1000 * (step + 1)), step)
            for key, values in curves.items()
            for step, value in enumerate(values)
        ]
        self.client.log_batch(run_id, metrics=metrics)

    def log_artifacts(self, run_id: str, files: dict[str, bytes]) -> None:
        local_dir = _write_artifact_tree(self.artifact_sources / run_id, files)
        self.client.log_artifacts(run_id, str(local_dir))

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status, end_time=self.run_time(600_000))


def _csv_bytes(header: list[str], rows) -> bytes:
    lines = [",".join(header)] + [",".join(str(cell) for cell in row) for row in rows]
    return ("\n".join(lines) + "\n").encode()


def _decaying_curve(start: float, rate: float, steps: int) -> list[float]:
    return [round(start * (1.0 - rate) ** step, 6) for step in range(steps)]


def _log_sample_runs(client: MlflowClient, artifact_sources: Path) -> None:
    """Log the sample store: Default plus three experiments, with ten runs in all.

    The runs include FAILED, KILLED and still RUNNING runs, a deleted run and
    a parent with two child runs. Metric histories include a NaN value, two
    values at one step and floats that need 17 significant digits. Names
    contain unicode and spaces, one tag value has several lines, and artifacts
    sit in nested folders.
    """
    runs = _SampleLogger(client, artifact_sources)

    smoke = runs.start_run("0", "smoke-test", tags={"purpose": "smoke"})
    runs.log_params(smoke, {"dry_run": "true"})
    runs.log_curves(smoke, {"ok": [1.0]})
    runs.finish(smoke)

    mnist = client.create_experiment(
        "mnist-baseline",
        tags={"team": "vision", "mlflow.note.content": "Baseline CNN on MNIST."},
    )
    baseline = runs.start_run(
        mnist,
        "baseline-lr-0.1",
        tags={
            "model": "cnn",
            "mlflow.user": "researcher-a",
            "mlflow.source.name": "train.py",
            "mlflow.source.type": "LOCAL",
            "mlflow.note.content": "First baseline.\nSecond line of the description.",
        },
    )
    runs.log_params(baseline, {"lr": "0.1", "batch_size": "64", "optimizer": "sgd"})
    runs.log_curves(
        baseline,
        {
            "loss": _decaying_curve(2.3, 0.25, 10),
            "accuracy": [round(0.1 + 0.088 * step, 6) for step in range(10)],
            "val_loss": _decaying_curve(2.4, 0.2, 10),
        },
    )
    runs.log_artifacts(
        baseline,
        {
            "README.txt": b"Baseline CNN, learning rate 0.1.\n",
            "config/params.json": json.dumps(
                {"lr": 0.1, "batch_size": 64, "optimizer": "sgd"}, sort_keys=True
            ).encode(),
            "weights/model.bin": _deterministic_bytes("baseline weights", 4096),
            "plots/sub/curve.csv": _csv_bytes(
                ["step", "loss"], enumerate(_decaying_curve(2.3, 0.25, 10))
            ),
        },
    )
    runs.finish(baseline)

    small_lr = runs.start_run(mnist, "baseline-lr-0.01", tags={"model": "cnn"})
    runs.log_params(small_lr, {"lr": "0.01", "batch_size": "64", "optimizer": "sgd"})
    runs.log_curves(
        small_lr,
        {"loss": _decaying_curve(2.3, 0.05, 10), "accuracy": [0.1 + 0.02 * s for s in range(10)]},
    )
    runs.log_artifacts(small_lr, {"notes.txt": b"Converges slowly.\n"})
    runs.finish(small_lr)

    diverged = runs.start_run(mnist, "diverged", tags={"model": "cnn", "diagnosis": "lr too high"})
    runs.log_params(diverged, {"lr": "1.0", "batch_size": "64", "optimizer": "sgd"})
    runs.log_curves(diverged, {"loss": [2.3, 7.9, 1.0e12, float("nan")]})
    runs.finish(diverged, status="FAILED")

    scratch = runs.start_run(mnist, "scratch", tags={"model": "cnn"})
    runs.log_params(scratch, {"lr": "0.5"})
    runs.log_curves(scratch, {"loss": [2.3, 2.2]})
    runs.finish(scratch)
    client.delete_run(scratch)

    sweep = client.create_experiment("resnet-sweep", tags={"team": "vision", "sweep": "lr"})
    parent = runs.start_run(sweep, "sweep", tags={"model": "resnet18"})
    runs.log_params(parent, {"search_space": "lr in {0.1, 0.03}"})
    for index, (lr, status) in enumerate([("0.1", "FINISHED"), ("0.03", "KILLED")]):
        child = runs.start_run(
            sweep, f"trial-{index}", tags={"model": "resnet18", "mlflow.parentRunId": parent}
        )
        runs.log_params(child, {"lr": lr})
        runs.log_curves(
            child, {"val_acc": [round(0.5 + 0.07 * s + 0.01 * index, 6) for s in range(5)]}
        )
        runs.finish(child, status=status)
    runs.log_curves(parent, {"best_val_acc": [0.78]})
    runs.finish(parent)

    nlp = client.create_experiment("nlp finetune (ünïcode)", tags={"team": "nlp"})
    finetune = runs.start_run(
        nlp,
        "finetune-ä",
        tags={"model": "bert-base", "notes": "line one\nline two: ünïcode"},
    )
    runs.log_params(
        finetune,
        {"prompt_template": "Summarize: {text}\n" * 20, "max_length": "512"},
    )
    runs.log_curves(
        finetune,
        {
            "loss": [0.1 + 0.2, 1 / 3, 2 / 3, 1e-12, -0.5],
            "tokens_per_second": [12345678.9, 12345679.1, 12345680.3, 12345677.7, 12345678.0],
        },
    )
    # A second value at step 4, one millisecond after the first. The history keeps both.
    client.log_metric(finetune, "loss", -0.25, timestamp=runs.run_time(5001), step=4)
    runs.log_artifacts(
        finetune,
        {
            "eval results/summary 1.txt": "Rouge-L: 0.41\nünïcode ✓\n".encode(),
            "eval results/scores.json": json.dumps({"rouge_l": 0.41}).encode(),
        },
    )
    runs.finish(finetune)

    in_progress = runs.start_run(nlp, "in-progress", tags={"model": "bert-large"})
    runs.log_params(in_progress, {"max_length": "1024"})
    runs.log_curves(in_progress, {"loss": [0.9, 0.8, 0.7]})


def _log_generated_runs(client: MlflowClient, runs: int, metric_steps: int) -> None:
    """Log runs in one experiment, each with three params and three metrics of metric_steps steps.

    Each run takes three requests (create, log_batch, update) as long as its
    metric points fit in one log_batch call.
    """
    experiment_id = client.create_experiment("generated")
    for index in range(runs):
        start_time = BASE_TIMESTAMP_MS + index * 60_000
        run_id = client.create_run(
            experiment_id,
            start_time=start_time,
            run_name=f"run-{index:05d}",
            tags={"index": str(index)},
        ).info.run_id
        params = [
            Param("lr", str(round(0.001 * (index % 10 + 1), 6))),
            Param("seed", str(index)),
            Param("batch_size", str(32 * (index % 4 + 1))),
        ]
        metrics = [
            Metric(
                key,
                round(scale * (1.0 + index % 7) / (step + 1), 6),
                start_time + step * 1000,
                step,
            )
            for key, scale in (("loss", 1.0), ("val_loss", 1.1), ("accuracy", 0.01))
            for step in range(metric_steps)
        ]
        # The REST API accepts at most 1000 metrics per log_batch call.
        for offset in range(0, len(metrics), 1000):
            client.log_batch(
                run_id,
                metrics=metrics[offset : offset + 1000],
                params=params if offset == 0 else [],
            )
        client.set_terminated(run_id, end_time=start_time + metric_steps * 1000)


def _log_added_run(
    client: MlflowClient, experiment_id: str, run_name: str, artifact_sources: Path
) -> None:
    run_id = client.create_run(
        experiment_id,
        start_time=BASE_TIMESTAMP_MS + 100 * 3_600_000,
        run_name=run_name,
        tags={"model": "cnn", "added": "after first publication"},
    ).info.run_id
    client.log_batch(
        run_id,
        params=[Param("lr", "0.05")],
        metrics=[
            Metric("loss", value, BASE_TIMESTAMP_MS + 100 * 3_600_000 + step * 1000, step)
            for step, value in enumerate([2.0, 1.5, 1.2])
        ],
    )
    local_dir = _write_artifact_tree(
        artifact_sources / run_id, {"added/notes.txt": b"Logged after the first publication.\n"}
    )
    client.log_artifacts(run_id, str(local_dir))
    client.set_terminated(run_id, end_time=BASE_TIMESTAMP_MS + 100 * 3_600_000 + 60_000)


# ---------------------------------------------------------------------------
# Reading the source store back


def artifact_key_prefix(artifact_uri: str) -> str:
    """Return the artifacts-bucket key prefix, ending in "/", of a run's mlflow-artifacts URI.

    Holds for a server whose --artifacts-destination is the bucket root.
    Raises ValueError for other URI schemes.
    """
    parsed = urllib.parse.urlparse(artifact_uri)
    if parsed.scheme != "mlflow-artifacts":
        raise ValueError(f"expected an mlflow-artifacts: URI, got {artifact_uri!r}")
    return parsed.path.strip("/") + "/"


def _list_server_artifacts(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            files.extend(_list_server_artifacts(client, run_id, item.path))
        else:
            files.append(item.path)
    return files


def _search_all_runs(client: MlflowClient, experiment_ids: list[str]):
    runs = []
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids,
            run_view_type=ViewType.ALL,
            max_results=1000,
            order_by=["attributes.start_time ASC"],
            page_token=page_token,
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def build_manifest(
    client: MlflowClient,
    s3: S3Server,
    metrics_bucket: str,
    artifacts_bucket: str,
    prefix: str,
    check_artifact_listing: bool = True,
) -> StoreManifest:
    """Read every experiment and run (deleted ones too) from the server behind client.

    Artifacts are read from the artifacts bucket. With check_artifact_listing,
    raises RuntimeError when the server's artifact listing of a run differs
    from the bucket keys, which would mean the documented layout is wrong.
    That check costs one request per artifact folder.
    """
    experiments = [
        ExperimentRecord(
            experiment_id=experiment.experiment_id,
            name=experiment.name,
            lifecycle_stage=experiment.lifecycle_stage,
            tags=dict(experiment.tags),
            artifact_location=experiment.artifact_location,
        )
        for experiment in client.search_experiments(view_type=ViewType.ALL)
    ]
    experiments.sort(key=lambda experiment: int(experiment.experiment_id))

    artifact_digests = s3.sha256_of_objects(artifacts_bucket)
    artifact_sizes = {
        item["Key"]: item["Size"]
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=artifacts_bucket)
        for item in page.get("Contents", [])
    }

    runs = []
    for run in _search_all_runs(client, [experiment.experiment_id for experiment in experiments]):
        info = run.info
        metrics = {}
        for key in sorted(run.data.metrics):
            history = client.get_metric_history(info.run_id, key)
            metrics[key] = sorted((point.step, point.value, point.timestamp) for point in history)

        key_prefix = artifact_key_prefix(info.artifact_uri)
        artifacts = {
            key[len(key_prefix) :]: ArtifactRecord(sha256=digest, size=artifact_sizes[key])
            for key, digest in sorted(artifact_digests.items())
            if key.startswith(key_prefix)
        }
        if check_artifact_listing:
            listed = sorted(_list_server_artifacts(client, info.run_id))
            if listed != sorted(artifacts):
                raise RuntimeError(
                    f"run {info.run_id}: the server lists artifacts {listed}, but the bucket "
                    f"{artifacts_bucket} holds {sorted(artifacts)} under {key_prefix}"
                )

        runs.append(
            RunRecord(
                run_id=info.run_id,
                experiment_id=info.experiment_id,
                name=info.run_name,
                status=info.status,
                lifecycle_stage=info.lifecycle_stage,
                start_time=info.start_time,
                end_time=info.end_time,
                artifact_uri=info.artifact_uri,
                params=dict(run.data.params),
                tags=dict(run.data.tags),
                metrics=metrics,
                artifacts=artifacts,
            )
        )

    return StoreManifest(
        metrics_bucket=metrics_bucket,
        artifacts_bucket=artifacts_bucket,
        prefix=prefix,
        mlflow_version=mlflow.__version__,
        experiments=experiments,
        runs=runs,
    )


# ---------------------------------------------------------------------------
# Publishing


def _ensure_bucket(s3: S3Server, name: str) -> None:
    if name not in {bucket["Name"] for bucket in s3.client().list_buckets()["Buckets"]}:
        s3.create_bucket(name)


def _log_and_publish(
    s3: S3Server,
    metrics_bucket: str,
    artifacts_bucket: str,
    work_dir: Path,
    prefix: str,
    log_content,
    check_artifact_listing: bool = True,
) -> StoreManifest:
    """Run the source server on work_dir/mlruns, call log_content(client), record and publish.

    Writes the manifest to work_dir/manifest.json and returns it.
    """
    prefix = prefix.strip("/")
    _ensure_bucket(s3, metrics_bucket)
    _ensure_bucket(s3, artifacts_bucket)

    started = time.monotonic()
    server = _start_source_server(s3, artifacts_bucket, work_dir)
    try:
        server_ready = time.monotonic()
        client = MlflowClient(tracking_uri=server.url)
        # set_terminated() prints a "View run" line per run unless this is set.
        with mock.patch.dict(os.environ, {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}):
            log_content(client)
        logging_done = time.monotonic()
        manifest = build_manifest(
            client, s3, metrics_bucket, artifacts_bucket, prefix, check_artifact_listing
        )
    finally:
        server.stop()

    manifest_done = time.monotonic()
    rclone_copy(s3, work_dir / "mlruns", s3_remote_path(metrics_bucket, prefix))
    finished = time.monotonic()

    manifest.write(work_dir / MANIFEST_FILE_NAME)
    logger.info(
        "published %d runs to s3://%s/%s in %.1f s: server start %.1f s, logging %.1f s, "
        "manifest and server stop %.1f s, rclone %.1f s",
        len(manifest.runs),
        metrics_bucket,
        prefix,
        finished - started,
        server_ready - started,
        logging_done - server_ready,
        manifest_done - logging_done,
        finished - manifest_done,
    )
    return manifest


def _prepare_work_dir(work_dir: Path) -> Path:
    work_dir = Path(work_dir).resolve()
    if (work_dir / "mlruns").exists():
        raise FileExistsError(
            f"{work_dir / 'mlruns'} already exists. Pass an empty work_dir, or use "
            "add_run_to_published_store() to extend a published store."
        )
    work_dir.mkdir(parents=True, exist_ok=True)
    return work_dir


def publish_sample_store(
    s3: S3Server,
    metrics_bucket: str,
    artifacts_bucket: str,
    work_dir: Path,
    prefix: str = "",
) -> StoreManifest:
    """Log the sample store with a real MLflow server, publish it and return its manifest.

    The buckets are created when missing. work_dir must not contain `mlruns`
    yet. It keeps `mlruns`, the artifact sources, `source-server.log` and
    `manifest.json`, which add_run_to_published_store() reuses.
    """
    work_dir = _prepare_work_dir(work_dir)
    artifact_sources = work_dir / "artifact-sources"
    return _log_and_publish(
        s3,
        metrics_bucket,
        artifacts_bucket,
        work_dir,
        prefix,
        lambda client: _log_sample_runs(client, artifact_sources),
    )


def publish_generated_store(
    s3: S3Server,
    metrics_bucket: str,
    artifacts_bucket: str,
    work_dir: Path,
    runs: int = 500,
    metric_steps: int = 20,
    prefix: str = "",
) -> StoreManifest:
    """Log one experiment of `runs` runs with log_batch, publish it and return its manifest.

    The runs have no artifacts. Reading the manifest back costs one
    get-history request per metric key and run.
    """
    work_dir = _prepare_work_dir(work_dir)
    return _log_and_publish(
        s3,
        metrics_bucket,
        artifacts_bucket,
        work_dir,
        prefix,
        lambda client: _log_generated_runs(client, runs, metric_steps),
        check_artifact_listing=False,
    )


def add_run_to_published_store(
    s3: S3Server,
    work_dir: Path,
    run_name: str = "added-run",
    experiment_name: str = "mnist-baseline",
) -> StoreManifest:
    """Log one more run into the store published from work_dir and publish it again.

    Returns the new manifest, which is also written to work_dir/manifest.json.
    The bucket names and prefix come from work_dir/manifest.json. The added run
    is FINISHED, is named run_name and has one param, one metric history and
    the artifact `added/notes.txt`. rclone copy uploads new and changed files
    only, and deletes nothing in the bucket.
    """
    work_dir = Path(work_dir).resolve()
    previous = StoreManifest.read(work_dir / MANIFEST_FILE_NAME)
    experiment_id = previous.experiment_by_name(experiment_name).experiment_id
    artifact_sources = work_dir / "artifact-sources"
    return _log_and_publish(
        s3,
        previous.metrics_bucket,
        previous.artifacts_bucket,
        work_dir,
        previous.prefix,
        lambda client: _log_added_run(client, experiment_id, run_name, artifact_sources),
    )
