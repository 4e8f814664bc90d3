"""A researcher publishes a new run: the next apply imports it, and only then."""

from __future__ import annotations

import pytest

from testbench.compare import viewer_differences
from testbench.store import add_run_to_published_store, publish_sample_store
from tests.conftest import make_replay, node_address

pytestmark = pytest.mark.bench

NODE = ("refresh1", node_address(15))
VIEWER_URL = f"http://{NODE[1]}:8000"
# Buckets of their own: this module changes its store, the shared one must not change.
METRICS_BUCKET = "growing-mlruns"
ARTIFACTS_BUCKET = "growing-artifacts"
IMPORT_TASK = "Import the store when it changed since the last import"


@pytest.fixture(scope="module")
def node(bench):
    (booted,) = bench.boot([NODE])
    return booted


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("growing-store")


@pytest.fixture(scope="module")
def replay(tmp_path_factory, bench, node, s3, store_dir):
    publish_sample_store(s3, METRICS_BUCKET, ARTIFACTS_BUCKET, store_dir)
    replay = make_replay(tmp_path_factory.mktemp("refresh"), bench, [node], s3,
                         metrics_container=METRICS_BUCKET, artifacts_container=ARTIFACTS_BUCKET)
    first = replay.runner("apply")
    assert first.returncode == 0, first.output
    yield replay
    replay.runner("teardown")


def test_unchanged_store_not_reimported(replay, node):
    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert IMPORT_TASK not in result.changed_tasks(node.name)
    assert result.recap(node.name)["changed"] == 0


def test_new_run_is_imported(replay, node, s3, store_dir):
    manifest = add_run_to_published_store(s3, store_dir)

    result = replay.runner("apply")

    assert result.returncode == 0, result.output
    assert IMPORT_TASK in result.changed_tasks(node.name)
    assert viewer_differences(VIEWER_URL, manifest) == []
    assert replay.runner("apply").recap(node.name)["changed"] == 0
