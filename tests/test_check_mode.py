"""`apply --check` on a fresh node reports what it would do and changes nothing."""

from __future__ import annotations

import pytest

from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("check1", node_address(14))
# Every place where apply leaves a trace on a node.
TRACES = "ls -d /etc/mlflow-replay /opt/mlflow-replay /srv/mlflow-replay /var/lib/mlflow-replay " \
         "/etc/systemd/system/mlflow-replay-* 2>/dev/null; getent passwd mlflow-replay; " \
         "cat /var/log/apt/history.log 2>/dev/null | wc -l"


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


def test_check_mode_changes_nothing(tmp_path, bench, node, s3, published_store):
    replay = make_replay(tmp_path, bench, [node], s3)
    before = node.run(TRACES, check=False).stdout

    result = replay.runner("apply", "--check", "--diff")

    assert result.returncode == 0, result.output
    assert result.recap(node.name)["changed"] > 0
    after = node.run(TRACES, check=False).stdout
    assert after == before
    assert "mlflow-replay" not in after
    assert s3.secret_key not in result.output
