"""Unit tests of the Ansible filters that teardown and the recap rely on."""

from __future__ import annotations

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
