"""Compare what an MLflow viewer serves with the manifest of the published store.

The viewer is queried the way people and programs use it: the MLflow Python
client for searches, metric histories, artifact listings and downloads, and
plain REST calls for `runs/get` (the run page) and `/get-artifact` (the UI's
artifact preview).

Not compared, because an importer may legitimately change them while the
viewer still shows the same data: experiment `artifact_location`, run
`artifact_uri`, experiment creation and update times, and MLflow version.
Artifacts are compared by content instead of by URI.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Collection
from pathlib import Path

# `import mlflow` starts MLflow's telemetry client unless this is set first,
# and the bench must send no traffic off this machine.
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"

import mlflow.artifacts  # noqa: E402
import requests  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from testbench.store import RunRecord, StoreManifest  # noqa: E402

REQUEST_TIMEOUT_SECONDS = 60


def _format_point(point: tuple[int, float, int]) -> str:
    step, value, timestamp = point
    return f"(step={step}, value={value!r}, timestamp={timestamp})"


def _point_key(point: tuple[int, float, int]) -> tuple[int, str, int]:
    # repr() makes NaN equal to NaN and keeps every bit of a finite float.
    step, value, timestamp = point
    return step, repr(float(value)), timestamp


def _dict_differences(
    label: str, expected: dict[str, str], actual: dict[str, str], ignored_extra: frozenset[str]
) -> list[str]:
    differences = []
    for key in sorted(expected):
        if key not in actual:
            differences.append(f"{label}: {key!r} is missing (expected {expected[key]!r})")
        elif actual[key] != expected[key]:
            differences.append(f"{label}: {key!r} is {actual[key]!r}, expected {expected[key]!r}")
    for key in sorted(set(actual) - set(expected) - ignored_extra):
        differences.append(f"{label}: unexpected {key!r} = {actual[key]!r}")
    return differences


def _metric_history_differences(
    label: str, expected: list[tuple[int, float, int]], actual: list[tuple[int, float, int]]
) -> list[str]:
    expected_keys = sorted(_point_key(point) for point in expected)
    actual_keys = sorted(_point_key(point) for point in actual)
    if expected_keys == actual_keys:
        return []

    remaining = list(actual_keys)
    missing = []
    for key in expected_keys:
        if key in remaining:
            remaining.remove(key)
        else:
            missing.append(key)
    differences = []
    for step, value, timestamp in missing:
        differences.append(
            f"{label}: point {_format_point((step, float(value), timestamp))} is missing"
        )
    for step, value, timestamp in remaining:
        differences.append(
            f"{label}: unexpected point {_format_point((step, float(value), timestamp))}"
        )
    return differences


def _experiment_differences(
    client: MlflowClient, manifest: StoreManifest, ignored_extra_tag_keys: frozenset[str]
) -> list[str]:
    actual = {
        experiment.experiment_id: experiment
        for experiment in client.search_experiments(view_type=ViewType.ALL)
    }
    expected = {experiment.experiment_id: experiment for experiment in manifest.experiments}

    differences = []
    for experiment_id in sorted(set(actual) - set(expected)):
        differences.append(
            f"unexpected experiment {experiment_id} ({actual[experiment_id].name!r})"
        )
    for experiment_id, record in sorted(expected.items()):
        label = f"experiment {experiment_id} ({record.name!r})"
        if experiment_id not in actual:
            differences.append(f"{label} is missing")
            continue
        experiment = actual[experiment_id]
        if experiment.name != record.name:
            differences.append(f"{label}: name is {experiment.name!r}")
        if experiment.lifecycle_stage != record.lifecycle_stage:
            differences.append(
                f"{label}: lifecycle_stage is {experiment.lifecycle_stage!r}, "
                f"expected {record.lifecycle_stage!r}"
            )
        differences += _dict_differences(
            f"{label} tag", record.tags, dict(experiment.tags), ignored_extra_tag_keys
        )
    return differences


def _search_all_runs(client: MlflowClient, experiment_ids: list[str]) -> list:
    runs = []
    page_token = None
    while True:
        page = client.search_runs(
            experiment_ids, run_view_type=ViewType.ALL, max_results=1000, page_token=page_token
        )
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def _run_info_differences(label: str, record: RunRecord, info) -> list[str]:
    differences = []
    for attribute, expected in (
        ("experiment_id", record.experiment_id),
        ("run_name", record.name),
        ("status", record.status),
        ("lifecycle_stage", record.lifecycle_stage),
        ("start_time", record.start_time),
        ("end_time", record.end_time),
    ):
        actual = getattr(info, attribute)
        if actual != expected:
            differences.append(f"{label}: {attribute} is {actual!r}, expected {expected!r}")
    return differences


def _rest_run_differences(
    session: requests.Session, tracking_uri: str, label: str, record: RunRecord
) -> list[str]:
    """Fetch the run with GET runs/get, as the run page does, and compare three of its fields."""
    response = session.get(
        f"{tracking_uri}/api/2.0/mlflow/runs/get",
        params={"run_id": record.run_id},
        timeout=REQUEST_TIMEOUT_SECONDS,
    )
    if response.status_code != 200:
        return [
            f"{label}: GET runs/get returned HTTP {response.status_code}: {response.text[:300]}"
        ]
    info = response.json()["run"]["info"]
    differences = []
    for field_name, expected in (
        ("status", record.status),
        ("lifecycle_stage", record.lifecycle_stage),
        ("experiment_id", record.experiment_id),
    ):
        if info.get(field_name) != expected:
            differences.append(
                f"{label}: runs/get returned {field_name} {info.get(field_name)!r}, "
                f"expected {expected!r}"
            )
    return differences


def _list_artifact_files(client: MlflowClient, run_id: str, path: str | None = None) -> list[str]:
    files = []
    for item in client.list_artifacts(run_id, path):
        if item.is_dir:
            files.extend(_list_artifact_files(client, run_id, item.path))
        else:
            files.append(item.path)
    return files


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _artifact_differences(
    client: MlflowClient,
    session: requests.Session,
    tracking_uri: str,
    label: str,
    record: RunRecord,
    download_dir: Path,
) -> list[str]:
    """Compare the viewer's artifact listing, downloads and /get-artifact bodies with record."""
    differences = []
    try:
        listed = set(_list_artifact_files(client, record.run_id))
    except MlflowException as error:
        return [f"{label}: listing artifacts failed: {error}"]
    for path in sorted(listed - set(record.artifacts)):
        differences.append(f"{label}: unexpected artifact {path!r}")

    for path, expected in sorted(record.artifacts.items()):
        artifact = f"{label}: artifact {path!r}"
        if path not in listed:
            differences.append(f"{artifact} is not listed")

        try:
            local_path = mlflow.artifacts.download_artifacts(
                run_id=record.run_id,
                artifact_path=path,
                tracking_uri=tracking_uri,
                dst_path=str(download_dir / record.run_id),
            )
        except (MlflowException, OSError, requests.RequestException) as error:
            differences.append(f"{artifact}: download through the client failed: {error}")
        else:
            actual_sha256 = _sha256_of_file(Path(local_path))
            if actual_sha256 != expected.sha256:
                differences.append(
                    f"{artifact}: client download has SHA-256 {actual_sha256}, "
                    f"expected {expected.sha256}"
                )

        response = session.get(
            f"{tracking_uri}/get-artifact",
            params={"run_uuid": record.run_id, "path": path},
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        if response.status_code != 200:
            differences.append(
                f"{artifact}: GET /get-artifact returned HTTP {response.status_code}"
            )
        else:
            actual_sha256 = hashlib.sha256(response.content).hexdigest()
            if actual_sha256 != expected.sha256:
                differences.append(
                    f"{artifact}: /get-artifact body has SHA-256 {actual_sha256}, "
                    f"expected {expected.sha256}"
                )
    return differences


def _run_differences(
    client: MlflowClient,
    session: requests.Session,
    tracking_uri: str,
    record: RunRecord,
    run,
    download_dir: Path,
    ignored_extra_tag_keys: frozenset[str],
) -> list[str]:
    label = f"run {record.run_id} ({record.name!r})"
    differences = _run_info_differences(label, record, run.info)
    differences += _rest_run_differences(session, tracking_uri, label, record)
    differences += _dict_differences(
        f"{label} param", record.params, dict(run.data.params), frozenset()
    )
    differences += _dict_differences(
        f"{label} tag", record.tags, dict(run.data.tags), ignored_extra_tag_keys
    )

    for key in sorted(set(run.data.metrics) - set(record.metrics)):
        differences.append(f"{label}: unexpected metric {key!r}")
    for key, expected_history in sorted(record.metrics.items()):
        history = [
            (point.step, point.value, point.timestamp)
            for point in client.get_metric_history(record.run_id, key)
        ]
        if not history:
            differences.append(f"{label}: metric {key!r} is missing")
            continue
        differences += _metric_history_differences(
            f"{label} metric {key!r}", expected_history, history
        )

    differences += _artifact_differences(client, session, tracking_uri, label, record, download_dir)
    return differences


def viewer_differences(
    tracking_uri: str, manifest: StoreManifest, ignored_extra_tag_keys: Collection[str] = ()
) -> list[str]:
    """Return every difference between the viewer at tracking_uri and the manifest.

    An empty list means the viewer serves exactly the manifest's experiments
    and runs, including deleted runs, with the same status, lifecycle stage,
    start and end time, params, tags, full metric histories and artifact
    bytes. Connection failures raise instead of being reported as differences.

    Every tag in the manifest is compared, system tags such as
    `mlflow.runName` and `mlflow.parentRunId` included. A tag that only the
    viewer shows is a difference unless its key is in ignored_extra_tag_keys,
    the place for tags that the product's importer adds on purpose. The
    default ignores none, because `mlflow migrate-filestore` (MLflow 3.17.2)
    adds no experiment or run tags.
    """
    ignored = frozenset(ignored_extra_tag_keys)
    tracking_uri = tracking_uri.rstrip("/")
    client = MlflowClient(tracking_uri=tracking_uri)
    session = requests.Session()
    # Proxy settings from the environment must not route requests to the viewer.
    session.trust_env = False

    differences = _experiment_differences(client, manifest, ignored)

    experiment_ids = [
        experiment.experiment_id for experiment in client.search_experiments(view_type=ViewType.ALL)
    ]
    actual_runs = {}
    if experiment_ids:
        actual_runs = {run.info.run_id: run for run in _search_all_runs(client, experiment_ids)}
    expected_runs = {record.run_id: record for record in manifest.runs}
    for run_id in sorted(set(actual_runs) - set(expected_runs)):
        differences.append(f"unexpected run {run_id} ({actual_runs[run_id].info.run_name!r})")

    with tempfile.TemporaryDirectory(prefix="viewer-artifacts-") as download_dir:
        for run_id, record in sorted(expected_runs.items()):
            if run_id not in actual_runs:
                differences.append(f"run {run_id} ({record.name!r}) is missing")
                continue
            differences += _run_differences(
                client,
                session,
                tracking_uri,
                record,
                actual_runs[run_id],
                Path(download_dir),
                ignored,
            )
    return differences
