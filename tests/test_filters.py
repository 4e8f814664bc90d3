"""Unit tests of the Ansible filters that teardown and the recap rely on."""

from __future__ import annotations

from plugins.filter.masked_diff import mlflow_replay_masked_diff
from plugins.filter.packages import mlflow_replay_missing_packages
from plugins.filter.mlflow_replay import mlflow_replay_installed_names, mlflow_replay_removed, mlflow_replay_report
from mlflow_replay.vars_file import DEFAULT_LAYOUT


def test_installed_names_from_dirs_and_units():
    paths = [
        "/etc/mlflow-replay/alpha",
        "/var/lib/mlflow-replay/beta",
        "/etc/systemd/system/mlflow-replay-gamma-2-server.service",
        "/etc/systemd/system/mlflow-replay-alpha-metrics.service",
        "/etc/systemd/system/ssh.service",
        "/etc/systemd/system/mlflow-replay-delta-other.service",
    ]

    assert mlflow_replay_installed_names(paths, DEFAULT_LAYOUT) == ["alpha", "beta", "gamma-2"]


def test_report_uses_inventory_address():
    replays = [{"name": "demo", "port": 8000}]
    responses = [{"experiments": [{"name": "b"}, {"name": "a"}]}]

    (report,) = mlflow_replay_report(responses, replays, "192.5.87.10", {})

    assert report["urls"] == ["http://192.5.87.10:8000/"]
    assert report["experiments"] == ["a", "b"]
    assert "serves 2 experiments" in report["summary"]


def test_report_uses_local_addresses():
    facts = {"all_ipv4_addresses": ["127.0.0.1", "10.52.0.7", "172.17.0.1"]}

    (report,) = mlflow_replay_report([{}], [{"name": "demo", "port": 9000}], "", facts)

    assert report["urls"] == ["http://10.52.0.7:9000/", "http://172.17.0.1:9000/"]
    assert report["experiments"] == []


def test_removed_keeps_desired_replays():
    removed = mlflow_replay_removed(["a", "b", "c"], [{"name": "b"}], [], DEFAULT_LAYOUT)

    assert [replay["name"] for replay in removed] == ["a", "c"]
    assert removed[0]["server_unit"] == "mlflow-replay-a-server.service"


def test_removed_limited_to_selected_names():
    removed = mlflow_replay_removed(["a", "b", "c"], [], ["c", "z"], DEFAULT_LAYOUT)

    assert [replay["name"] for replay in removed] == ["c"]


# rclone.conf texts for the masked diff of `apply --check --diff`.
OLD_CONF = "[store]\ntype = s3\nendpoint = http://old:9000\naccess_key_id = OLDKEYID\nsecret_access_key = OLDSECRET\n"


def test_masked_diff_marks_changed_secret():
    new_conf = OLD_CONF.replace("OLDSECRET", "NEWSECRET").replace("old:9000", "new:9000")

    diff = mlflow_replay_masked_diff(OLD_CONF, new_conf)

    assert "OLDSECRET" not in diff
    assert "NEWSECRET" not in diff
    assert "OLDKEYID" not in diff
    assert "+secret_access_key = <hidden, changed>" in diff
    assert "-endpoint = http://old:9000" in diff
    assert "+endpoint = http://new:9000" in diff
    assert "+access_key_id" not in diff  # unchanged: a context line at most


def test_masked_diff_of_new_file():
    diff = mlflow_replay_masked_diff("", OLD_CONF)

    assert "OLD" not in diff.replace("old:9000", "")
    assert "+access_key_id = <hidden, changed>" in diff


def test_masked_diff_is_empty_when_nothing_changed():
    assert mlflow_replay_masked_diff(OLD_CONF, OLD_CONF) == ""


def test_missing_packages_reads_dpkg_query_output():
    output = "fuse3:amd64 installed\npython3-venv config-files\nnginx installed\n"

    missing = mlflow_replay_missing_packages(output, ["fuse3", "python3-venv", "python3-packaging", "nginx"])

    assert missing == ["python3-venv", "python3-packaging"]


def test_missing_packages_when_dpkg_knows_none():
    assert mlflow_replay_missing_packages("", ["nginx"]) == ["nginx"]
