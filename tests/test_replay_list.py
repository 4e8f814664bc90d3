"""Several replays on one node: add one, remove one, tear one down."""

from __future__ import annotations

import pytest

from testbench.compare import viewer_differences
from tests.conftest import ARTIFACTS_BUCKET, METRICS_BUCKET, make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("multi1", node_address(13))


def entry(name: str, port: int) -> dict:
    return {"name": name, "metrics_container": METRICS_BUCKET, "artifacts_container": ARTIFACTS_BUCKET,
            "port": port}


def replay_units(node, name: str) -> list[str]:
    listing = node.run("ls /etc/systemd/system").stdout.split()
    return sorted(unit for unit in listing if unit.startswith(f"mlflow-replay-{name}-"))


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, published_store):
    replay = make_replay(tmp_path_factory.mktemp("multi"), bench, [node], s3)
    settings = {"endpoint": s3.endpoint, "runtime": "native", "replays": [entry("first", 8000)]}
    replay.write_settings(settings)
    yield replay
    replay.runner("teardown")


def test_list_form_serves_each_replay(replay, node, published_store):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert viewer_differences(f"http://{NODE[1]}:8000", published_store) == []


def test_added_replay_deploys_only_it(replay, node, published_store):
    settings = replay.settings()
    settings["replays"].append(entry("second", 8001))
    replay.write_settings(settings)
    first_server_pid = node.run("systemctl show -p MainPID --value mlflow-replay-first-server.service").stdout

    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert viewer_differences(f"http://{NODE[1]}:8001", published_store) == []
    assert node.run("systemctl show -p MainPID --value mlflow-replay-first-server.service").stdout == first_server_pid
    assert replay.runner("apply").recap(node.name)["changed"] == 0


def test_removed_replay_is_removed_completely(replay, node, published_store):
    settings = replay.settings()
    settings["replays"] = [entry("second", 8001)]
    replay.write_settings(settings)

    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert replay_units(node, "first") == []
    for path in ("/etc/mlflow-replay/first", "/var/lib/mlflow-replay/first", "/srv/mlflow-replay/first"):
        assert node.run(f"test -e {path}", check=False).returncode != 0, path
    assert node.run("ss -ltn 'sport = :8000' | grep -q LISTEN", check=False).returncode != 0
    assert viewer_differences(f"http://{NODE[1]}:8001", published_store) == []
    assert replay.runner("apply").recap(node.name)["changed"] == 0


def test_teardown_of_one_replay_keeps_others(replay, node, published_store):
    settings = replay.settings()
    settings["replays"].append(entry("third", 8002))
    replay.write_settings(settings)
    assert replay.runner("apply").returncode == 0

    result = replay.runner("teardown", "--replay", "third")

    assert result.returncode == 0, result.output
    assert replay_units(node, "third") == []
    assert node.run("test -e /opt/mlflow-replay", check=False).returncode == 0, "shared pieces were removed"
    assert viewer_differences(f"http://{NODE[1]}:8001", published_store) == []
