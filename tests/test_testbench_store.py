"""End-to-end checks of the published-store test bench against real MLflow, moto and rclone.

A moto S3 server on 127.0.0.1 receives a sample store that a real MLflow
server wrote. A stand-in viewer then does what a node does in the simplest
way: rclone copies the metrics bucket to a local folder, `mlflow
migrate-filestore` imports it into a new SQLite database, and `mlflow server`
serves that database read-only with artifacts proxied from the artifacts
bucket. viewer_differences() must find nothing, and must find altered values.
"""

from __future__ import annotations

import hashlib
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from testbench.s3 import S3Server, rclone_copy, s3_remote_path, start_s3_server
from testbench.store import (
    MANIFEST_FILE_NAME,
    MlflowServer,
    StoreManifest,
    add_run_to_published_store,
    artifact_key_prefix,
    find_free_port,
    mlflow_executable,
    mlflow_server_environment,
    publish_generated_store,
    publish_sample_store,
    start_mlflow_server,
)
from testbench.compare import viewer_differences

pytestmark = pytest.mark.bench

METRICS_BUCKET = "published-metrics"
ARTIFACTS_BUCKET = "published-artifacts"
SAMPLE_PREFIX = "lab/published"


@dataclass
class StandInViewer:
    """A read-only MLflow server over a SQLite import of one published store."""

    server: MlflowServer
    database: Path
    database_sha256: str


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _start_stand_in_viewer(s3: S3Server, manifest: StoreManifest, work_dir: Path) -> StandInViewer:
    """Copy the published store to work_dir, import it with migrate-filestore and serve it."""
    work_dir.mkdir(parents=True)
    copy_dir = work_dir / "copy"
    rclone_copy(s3, s3_remote_path(manifest.metrics_bucket, manifest.prefix), copy_dir)

    database = work_dir / "viewer.db"
    migrate = subprocess.run(
        [
            str(mlflow_executable()),
            "migrate-filestore",
            "--no-progress",
            "--source",
            str(copy_dir),
            "--target",
            f"sqlite:///{database}",
        ],
        cwd=work_dir,
        env=mlflow_server_environment(s3),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert migrate.returncode == 0, f"migrate-filestore failed:\n{migrate.stdout}\n{migrate.stderr}"

    database_sha256 = _file_sha256(database)
    server = start_mlflow_server(
        backend_store_uri=f"sqlite:///file:{database}?immutable=1&uri=true",
        artifacts_destination=f"s3://{manifest.artifacts_bucket}",
        s3=s3,
        log_path=work_dir / "viewer.log",
        cwd=work_dir,
    )
    return StandInViewer(server=server, database=database, database_sha256=database_sha256)


@pytest.fixture(scope="module")
def s3(tmp_path_factory) -> S3Server:
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    server = start_s3_server(port=find_free_port(), log_path=log_path)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("source")


@pytest.fixture(scope="module")
def manifest(s3, source_dir) -> StoreManifest:
    return publish_sample_store(
        s3, METRICS_BUCKET, ARTIFACTS_BUCKET, source_dir, prefix=SAMPLE_PREFIX
    )


@pytest.fixture(scope="module")
def viewer(s3, manifest, tmp_path_factory) -> StandInViewer:
    stand_in = _start_stand_in_viewer(s3, manifest, tmp_path_factory.mktemp("viewer") / "sample")
    yield stand_in
    stand_in.server.stop()


# ---------------------------------------------------------------------------
# Published buckets


def test_metrics_bucket_has_experiment_meta(s3, manifest):
    keys = set(s3.list_keys(METRICS_BUCKET, SAMPLE_PREFIX + "/"))

    for experiment in manifest.experiments:
        assert f"{SAMPLE_PREFIX}/{experiment.experiment_id}/meta.yaml" in keys
    for run in manifest.runs:
        assert f"{SAMPLE_PREFIX}/{run.experiment_id}/{run.run_id}/meta.yaml" in keys


def test_metrics_bucket_has_no_empty_directories(s3, manifest, source_dir):
    keys = s3.list_keys(METRICS_BUCKET)
    mlruns = source_dir / "mlruns"

    assert [key for key in keys if key.endswith("/")] == []
    assert [key for key in keys if "/.trash/" in key or "/models/" in key] == []
    assert [key for key in keys if "/artifacts/" in key] == []
    # The local store has these empty folders, so their absence is rclone's doing.
    assert (mlruns / ".trash").is_dir()
    assert (mlruns / "models").is_dir()


def test_metrics_bucket_matches_local_files(s3, manifest, source_dir):
    mlruns = source_dir / "mlruns"
    local = {
        f"{SAMPLE_PREFIX}/{path.relative_to(mlruns).as_posix()}": _file_sha256(path)
        for path in mlruns.rglob("*")
        if path.is_file()
    }

    assert s3.sha256_of_objects(METRICS_BUCKET, SAMPLE_PREFIX + "/") == local


def test_artifacts_bucket_has_run_artifacts(s3, manifest):
    digests = s3.sha256_of_objects(ARTIFACTS_BUCKET)
    expected = {
        f"{run.experiment_id}/{run.run_id}/artifacts/{path}": record.sha256
        for run in manifest.runs
        for path, record in run.artifacts.items()
    }

    assert digests == expected
    assert "plots/sub/curve.csv" in manifest.run_by_name("baseline-lr-0.1").artifacts
    for run in manifest.runs:
        assert (
            artifact_key_prefix(run.artifact_uri) == f"{run.experiment_id}/{run.run_id}/artifacts/"
        )


def test_sample_store_is_small(s3, manifest):
    sizes = [
        item["Size"]
        for bucket in (METRICS_BUCKET, ARTIFACTS_BUCKET)
        for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket)
        for item in page.get("Contents", [])
    ]

    assert sum(sizes) < 1_000_000
    assert len(manifest.runs) == 10


# ---------------------------------------------------------------------------
# Manifest


def test_manifest_covers_sample_cases(manifest):
    runs = {run.name: run for run in manifest.runs}

    assert {experiment.name for experiment in manifest.experiments} == {
        "Default",
        "mnist-baseline",
        "resnet-sweep",
        "nlp finetune (ünïcode)",
    }
    assert runs["scratch"].lifecycle_stage == "deleted"
    assert runs["diverged"].status == "FAILED"
    assert runs["trial-1"].status == "KILLED"
    assert runs["in-progress"].status == "RUNNING"
    assert runs["in-progress"].end_time is None
    assert runs["trial-0"].tags["mlflow.parentRunId"] == runs["sweep"].run_id
    assert runs["baseline-lr-0.1"].tags["mlflow.runName"] == "baseline-lr-0.1"
    assert len(runs["baseline-lr-0.1"].metrics["loss"]) == 10
    diverged_values = [value for _, value, _ in runs["diverged"].metrics["loss"]]
    assert diverged_values[-1] != diverged_values[-1], "the last loss of 'diverged' must be NaN"
    steps = [step for step, _, _ in runs["finetune-ä"].metrics["loss"]]
    assert steps.count(4) == 2


def test_manifest_json_round_trip(manifest, source_dir):
    written = StoreManifest.read(source_dir / MANIFEST_FILE_NAME)

    assert written.to_json() == manifest.to_json()
    assert StoreManifest.from_json(manifest.to_json()).to_json() == manifest.to_json()


# ---------------------------------------------------------------------------
# Stand-in viewer


def test_viewer_matches_manifest(viewer, manifest):
    assert viewer_differences(viewer.server.url, manifest) == []


def _alter_param(manifest: StoreManifest) -> None:
    manifest.run_by_name("baseline-lr-0.1").params["lr"] = "0.2"


def _alter_metric_value(manifest: StoreManifest) -> None:
    history = manifest.run_by_name("baseline-lr-0.1").metrics["loss"]
    step, value, timestamp = history[3]
    history[3] = (step, value + 1e-9, timestamp)


def _alter_tag(manifest: StoreManifest) -> None:
    manifest.run_by_name("trial-0").tags["model"] = "resnet50"


def _alter_status(manifest: StoreManifest) -> None:
    manifest.run_by_name("diverged").status = "FINISHED"


def _alter_lifecycle_stage(manifest: StoreManifest) -> None:
    manifest.run_by_name("scratch").lifecycle_stage = "active"


def _alter_artifact_digest(manifest: StoreManifest) -> None:
    manifest.run_by_name("baseline-lr-0.1").artifacts["weights/model.bin"].sha256 = "0" * 64


def _drop_run(manifest: StoreManifest) -> None:
    manifest.runs.remove(manifest.run_by_name("in-progress"))


def _alter_experiment_tag(manifest: StoreManifest) -> None:
    manifest.experiment_by_name("resnet-sweep").tags["sweep"] = "batch_size"


@pytest.mark.parametrize(
    ("alter", "expected_fragment"),
    [
        (_alter_param, "param: 'lr' is '0.1', expected '0.2'"),
        (_alter_metric_value, "metric 'loss': point (step=3"),
        (_alter_tag, "tag: 'model' is 'resnet18', expected 'resnet50'"),
        (_alter_status, "status is 'FAILED', expected 'FINISHED'"),
        (_alter_lifecycle_stage, "lifecycle_stage is 'deleted', expected 'active'"),
        (_alter_artifact_digest, "artifact 'weights/model.bin': client download has SHA-256"),
        (_drop_run, "unexpected run"),
        (_alter_experiment_tag, "tag: 'sweep' is 'lr', expected 'batch_size'"),
    ],
    ids=lambda value: getattr(value, "__name__", None),
)
def test_viewer_differences_reports_alteration(viewer, manifest, alter, expected_fragment):
    altered = StoreManifest.from_json(manifest.to_json())
    alter(altered)

    differences = viewer_differences(viewer.server.url, altered)

    assert differences != []
    assert any(expected_fragment in difference for difference in differences), differences


def test_viewer_database_is_read_only(viewer):
    session = requests.Session()
    session.trust_env = False

    # A plain POST, because the MLflow 3.17.2 client retries HTTP 503 seven
    # times with exponential backoff.
    response = session.post(
        f"{viewer.server.url}/api/2.0/mlflow/experiments/create",
        json={"name": "written-by-test"},
        timeout=60,
    )

    # MLflow 3.17.2 maps SQLite's "attempt to write a readonly database" to HTTP 503.
    assert response.status_code == 503
    assert "readonly database" in response.text
    assert _file_sha256(viewer.database) == viewer.database_sha256


def test_migrate_filestore_keeps_run_fields(viewer, manifest):
    runs = {run.run_id: run for run in manifest.runs}
    with sqlite3.connect(f"file:{viewer.database}?immutable=1", uri=True) as connection:
        rows = connection.execute(
            "SELECT run_uuid, status, lifecycle_stage, start_time, end_time, artifact_uri FROM runs"
        ).fetchall()
        nan_rows = connection.execute("SELECT COUNT(*) FROM metrics WHERE is_nan").fetchone()

    assert len(rows) == len(runs)
    for run_uuid, status, lifecycle_stage, start_time, end_time, artifact_uri in rows:
        run = runs[run_uuid]
        assert (status, lifecycle_stage) == (run.status, run.lifecycle_stage)
        assert (start_time, end_time) == (run.start_time, run.end_time)
        assert artifact_uri == run.artifact_uri
        assert artifact_uri.startswith("mlflow-artifacts:/")
    assert nan_rows == (1,)


# ---------------------------------------------------------------------------
# Extending and generating stores


def test_added_run_is_published_and_served(s3, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("extended")
    prefix = "lab/extended"
    # A separate artifacts bucket keeps the sample's bucket identical to its manifest.
    first = publish_sample_store(s3, METRICS_BUCKET, "extended-artifacts", work_dir, prefix=prefix)

    extended = add_run_to_published_store(s3, work_dir, run_name="added-run")

    added = extended.run_by_name("added-run")
    assert len(extended.runs) == len(first.runs) + 1
    assert added.status == "FINISHED"
    assert set(added.artifacts) == {"added/notes.txt"}
    keys = s3.list_keys(METRICS_BUCKET, prefix + "/")
    assert f"{prefix}/{added.experiment_id}/{added.run_id}/meta.yaml" in keys
    assert StoreManifest.read(work_dir / MANIFEST_FILE_NAME).to_json() == extended.to_json()

    stand_in = _start_stand_in_viewer(s3, extended, work_dir / "viewer")
    try:
        assert viewer_differences(stand_in.server.url, extended) == []
    finally:
        stand_in.server.stop()


def test_generated_store_splits_large_batches(s3, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("generated")

    # 3 keys x 400 steps = 1200 points per run, more than the 1000 one log_batch call accepts.
    generated = publish_generated_store(
        s3, "generated-metrics", "generated-artifacts", work_dir, runs=3, metric_steps=400
    )

    assert len(generated.runs) == 3
    for run in generated.runs:
        assert sorted(run.metrics) == ["accuracy", "loss", "val_loss"]
        assert {len(history) for history in run.metrics.values()} == {400}
        assert run.status == "FINISHED"
        assert set(run.params) == {"lr", "seed", "batch_size"}
    meta_keys = [key for key in s3.list_keys("generated-metrics") if key.endswith("meta.yaml")]
    # Default, the "generated" experiment and three runs.
    assert len(meta_keys) == 5


def test_publish_rejects_used_work_dir(s3, source_dir, manifest):
    with pytest.raises(FileExistsError, match="already exists"):
        publish_sample_store(s3, METRICS_BUCKET, ARTIFACTS_BUCKET, source_dir)
