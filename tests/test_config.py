"""Unit tests of the vars parser shared by runner.py and the Ansible filter."""

from __future__ import annotations

import pytest

from mlflow_replay.config import ConfigError, normalise_replays, parse_container, parse_endpoint
from mlflow_replay.vars_file import DEFAULT_LAYOUT, validate_vars_file

TACC = "https://chi.tacc.chameleoncloud.org:7480"


@pytest.mark.parametrize(
    ("reference", "bucket", "prefix", "endpoint"),
    [
        ("my-mlruns", "my-mlruns", "", None),
        ("my-mlruns/", "my-mlruns", "", None),
        ("my-mlruns/team/exp1", "my-mlruns", "team/exp1", None),
        ("s3://my-mlruns", "my-mlruns", "", None),
        ("s3://my-mlruns/mlruns/", "my-mlruns", "mlruns", None),
        (f"{TACC}/swift/v1/AUTH_0123abcd/my-mlruns", "my-mlruns", "", TACC),
        (f"{TACC}/swift/v1/AUTH_0123abcd/my-mlruns/", "my-mlruns", "", TACC),
        (f"{TACC}/swift/v1/AUTH_0123abcd/my-mlruns/sub/dir", "my-mlruns", "sub/dir", TACC),
        (f"{TACC}/my-mlruns", "my-mlruns", "", TACC),
        ("http://10.0.0.2:9000/bucket-1/p", "bucket-1", "p", "http://10.0.0.2:9000"),
    ],
)
def test_container_reference_forms(reference, bucket, prefix, endpoint):
    ref = parse_container("metrics_container", reference)

    assert ref.bucket == bucket
    assert ref.prefix == prefix
    assert ref.endpoint == endpoint


@pytest.mark.parametrize(
    ("reference", "fragment"),
    [
        ("", "non-empty string"),
        (None, "non-empty string"),
        (42, "non-empty string"),
        (f"{TACC}/my-mlruns?versions", "no query string"),
        (f"{TACC}/my-mlruns#top", "no query string"),
        ("ftp://host/bucket", "unsupported URL"),
        (f"{TACC}/", "no container name"),
        ("UPPER", "not a valid S3 bucket name"),
        ("my-mlruns/../other", "'..' are not allowed"),
    ],
)
def test_container_reference_errors(reference, fragment):
    with pytest.raises(ConfigError) as raised:
        parse_container("metrics_container", reference)

    assert fragment in str(raised.value)
    assert "metrics_container" in str(raised.value)


def test_endpoint_rejects_path():
    with pytest.raises(ConfigError, match="without a path"):
        parse_endpoint(f"{TACC}/swift/v1")


def test_endpoint_from_container_url():
    settings = {
        "metrics_container": f"{TACC}/swift/v1/AUTH_p/runs",
        "artifacts_container": "artifacts",
    }

    (replay,) = normalise_replays(settings, DEFAULT_LAYOUT)

    assert replay["endpoint"] == TACC


def test_endpoint_conflict_is_error():
    settings = {
        "metrics_container": f"{TACC}/swift/v1/AUTH_p/runs",
        "artifacts_container": "artifacts",
        "endpoint": "https://chi.uc.chameleoncloud.org:7480",
    }

    with pytest.raises(ConfigError, match="disagrees"):
        normalise_replays(settings, DEFAULT_LAYOUT)


def test_missing_endpoint_is_error():
    with pytest.raises(ConfigError, match="endpoint: is missing"):
        normalise_replays({"metrics_container": "a-b", "artifacts_container": "c-d"}, DEFAULT_LAYOUT)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("port", 0, "port: must be an integer"),
        ("port", 70000, "port: must be an integer"),
        ("port", "8000", "port: must be an integer"),
        ("port", True, "port: must be an integer"),
        ("runtime", "podman", "runtime: is not supported"),
        ("name", "Demo", "name: must be"),
        ("name", "a_b", "name: must be"),
        ("workers", 0, "workers: must be"),
        ("anonymous", "yes", "anonymous: must be true or false"),
    ],
)
def test_invalid_settings(key, value, fragment):
    settings = {"metrics_container": "runs", "artifacts_container": "arts", "endpoint": TACC, key: value}

    with pytest.raises(ConfigError) as raised:
        normalise_replays(settings, DEFAULT_LAYOUT)

    assert fragment in str(raised.value)


def test_paths_follow_replay_name():
    settings = {"name": "exp7", "metrics_container": "runs", "artifacts_container": "arts", "endpoint": TACC}

    (replay,) = normalise_replays(settings, DEFAULT_LAYOUT)

    assert replay["rclone_config"] == "/etc/mlflow-replay/exp7/rclone.conf"
    assert replay["database"] == "/var/lib/mlflow-replay/exp7/snapshot.db"
    assert replay["server_unit"] == "mlflow-replay-exp7-server.service"
    assert [mount["unit"] for mount in replay["mounts"]] == [
        "mlflow-replay-exp7-metrics.service",
        "mlflow-replay-exp7-artifacts.service",
    ]
    assert [mount["remote_path"] for mount in replay["mounts"]] == ["runs", "arts"]


@pytest.mark.parametrize(("site", "endpoint"), [
    ("CHI@TACC", TACC),
    ("KVM@TACC", TACC),
    ("CHI@UC", "https://chi.uc.chameleoncloud.org:7480"),
])
def test_site_sets_endpoint(site, endpoint):
    (replay,) = normalise_replays({"site": site, "metrics_container": "runs", "artifacts_container": "arts"},
                                  DEFAULT_LAYOUT)

    assert replay["endpoint"] == endpoint


def test_site_and_endpoint_conflict():
    settings = {"site": "CHI@UC", "endpoint": TACC, "metrics_container": "runs", "artifacts_container": "arts"}

    with pytest.raises(ConfigError, match="disagrees with site CHI@UC"):
        normalise_replays(settings, DEFAULT_LAYOUT)


def test_unknown_site():
    with pytest.raises(ConfigError, match="site: is not a Chameleon site"):
        normalise_replays({"site": "CHI@NU", "metrics_container": "a-b", "artifacts_container": "c-d"},
                          DEFAULT_LAYOUT)


def test_unknown_key_suggests_typo_fix(tmp_path):
    vars_file = tmp_path / "replay.yml"
    vars_file.write_text("metrics_contaner: runs\nartifacts_container: arts\nsite: CHI@TACC\n")

    with pytest.raises(ConfigError) as raised:
        validate_vars_file(vars_file)

    assert "metrics_contaner: is not a known setting" in str(raised.value)
    assert "Did you mean 'metrics_container'?" in str(raised.value)


@pytest.mark.parametrize("text", ["key: [unclosed\n", "- a list\n", "just a string\n"])
def test_vars_file_not_a_mapping(tmp_path, text):
    vars_file = tmp_path / "replay.yml"
    vars_file.write_text(text)

    with pytest.raises(ConfigError, match="vars file"):
        validate_vars_file(vars_file)


def replay_list(*entries, **shared):
    return {"site": "CHI@TACC", **shared, "replays": list(entries)}


def test_replay_list_form():
    settings = replay_list(
        {"name": "a", "metrics_container": "runs-a", "artifacts_container": "arts-a", "port": 8000},
        {"name": "b", "metrics_container": "runs-b", "artifacts_container": "arts-b", "port": 8001,
         "site": "CHI@UC"},
    )

    first, second = normalise_replays(settings, DEFAULT_LAYOUT)

    assert (first["name"], first["port"], first["endpoint"]) == ("a", 8000, TACC)
    assert (second["name"], second["endpoint"]) == ("b", "https://chi.uc.chameleoncloud.org:7480")
    assert first["database"] != second["database"]


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (replay_list({"name": "a", "metrics_container": "r-1", "artifacts_container": "a-1", "port": 8000},
                     {"name": "b", "metrics_container": "r-2", "artifacts_container": "a-2", "port": 8000}),
         "replays[1].port: is already used by replay 'a'"),
        (replay_list({"name": "a", "metrics_container": "r-1", "artifacts_container": "a-1", "port": 8000},
                     {"name": "a", "metrics_container": "r-2", "artifacts_container": "a-2", "port": 8001}),
         "replays[1].name: is already used by replay 'a'"),
        (replay_list({"metrics_container": "r-1", "artifacts_container": "a-1"}), "replays[0].name: is missing"),
        (replay_list({"name": "a", "metrics_contaner": "r-1"}), "Did you mean 'metrics_container'?"),
        (replay_list({"name": "a", "metrics_container": "r-1", "artifacts_container": "a-1", "port": 0}),
         "replays[0].port: must be an integer"),
        (replay_list("just-a-name"), "replays[0]: must be a mapping"),
        ({"replays": []}, "replays: must be a non-empty list"),
        (replay_list({"name": "a", "metrics_container": "r-1", "artifacts_container": "a-1"}, port=8000),
         "port: cannot stand beside 'replays'"),
    ],
)
def test_replay_list_errors(settings, fragment):
    with pytest.raises(ConfigError) as raised:
        normalise_replays(settings, DEFAULT_LAYOUT)

    assert fragment in str(raised.value)


def test_runtime_defaults_to_docker():
    (replay,) = normalise_replays({"site": "CHI@TACC", "metrics_container": "runs", "artifacts_container": "arts"},
                                  DEFAULT_LAYOUT)

    assert replay["runtime"] == "docker"
