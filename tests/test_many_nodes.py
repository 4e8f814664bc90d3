"""Three nodes at once: parallel apply, a per-host port, --limit."""

from __future__ import annotations

import pytest

from testbench.compare import viewer_differences
from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

NODES = [("many1", node_address(21)), ("many2", node_address(22)), ("many3", node_address(23))]
OVERRIDE_PORT = 8005


@pytest.fixture(scope="module")
def nodes(bench):
    return bench.boot(NODES)


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, nodes, s3, published_store):
    replay = make_replay(tmp_path_factory.mktemp("many"), bench, nodes, s3)
    # A host variable in the inventory overrides the vars file for that node.
    inventory = replay.inventory.read_text().replace(
        f"many3 ansible_host={NODES[2][1]}", f"many3 ansible_host={NODES[2][1]} port={OVERRIDE_PORT}")
    assert f"port={OVERRIDE_PORT}" in inventory, "inventory format changed; update this test"
    replay.inventory.write_text(inventory)
    yield replay
    replay.runner("teardown")


def test_limit_applies_to_subset(replay, nodes):
    result = replay.runner("apply", "--limit", "many1")

    assert result.returncode == 0, result.output
    assert result.recap("many1")["failed"] == 0
    assert "many2 " not in result.output.split("PLAY RECAP")[-1]
    assert nodes[1].run("test -e /etc/mlflow-replay", check=False).returncode != 0


def test_apply_on_three_nodes(replay, nodes, published_store):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    for name, address in NODES:
        port = OVERRIDE_PORT if name == "many3" else 8000
        assert viewer_differences(f"http://{address}:{port}", published_store) == [], name
    again = replay.runner("apply")
    for name, _ in NODES:
        assert again.recap(name)["changed"] == 0, name
