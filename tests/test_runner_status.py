"""Health reports of `runner.py status`, from registered results shaped as Ansible returns them."""

from __future__ import annotations

import json

from mlflow_replay.status import replay_status
from mlflow_replay.summary import status_lines

REPLAY = {"name": "demo", "port": 8000}
MOUNTS = [{"kind": "metrics"}, {"kind": "artifacts"}]
NOW = 1_000_000.0


def probes(mount_state="active", snapshot=True, source=None, status=200):
    """Return the registered results of the replay_status role for REPLAY."""
    mounts = [{"item": [REPLAY, mount], "stdout": mount_state} for mount in MOUNTS]
    stat = {"exists": True, "size": 3 * 2**20, "mtime": NOW - 7200} if snapshot else {"exists": False}
    source = source or {"rc": 0, "stdout": json.dumps({"changed": False, "source_changed": False, "objects": 9})}
    health = {"status": status, "msg": "OK" if status == 200 else "Status code was 503 and not [200]: HTTP Error 503"}
    search = dict(health, json={"experiments": [{"name": "b"}, {"name": "a"}]} if status == 200 else None)
    return [REPLAY], mounts, [{"stat": stat}], [source], [health], [search]


def test_status_healthy_replay():
    (report,) = replay_status(*probes(), address="10.0.0.5", facts={}, now=NOW)

    assert report["healthy"] is True
    assert report["problems"] == []
    assert report["urls"] == ["http://10.0.0.5:8000/"]
    assert report["mounts"] == {"metrics": "active", "artifacts": "active"}
    assert report["snapshot"] == {"exists": True, "bytes": 3 * 2**20, "age_seconds": 7200}
    assert report["source"]["changed"] is False
    assert report["search"]["experiments"] == ["a", "b"]


def test_status_store_changed_still_healthy():
    source = {"rc": 0, "stdout": json.dumps({"changed": False, "source_changed": True, "objects": 10})}

    (report,) = replay_status(*probes(source=source), address="10.0.0.5", facts={}, now=NOW)

    assert report["healthy"] is True
    assert report["source"]["changed"] is True
    assert "rerun apply" in report["summary"]


def test_status_unhealthy_replay_lists_problems():
    source = {"rc": 1, "stderr": "import-snapshot: listing store:bucket failed (exit 3): directory not found"}

    (report,) = replay_status(*probes("failed", False, source, 503), address="", now=NOW,
                              facts={"all_ipv4_addresses": ["127.0.0.1", "192.168.1.4"]})

    assert report["healthy"] is False
    assert report["urls"] == ["http://192.168.1.4:8000/"]
    assert report["problems"] == [
        "mount metrics is failed",
        "mount artifacts is failed",
        "no snapshot imported",
        "listing the store failed: import-snapshot: listing store:bucket failed (exit 3): directory not found",
        "/health failed: HTTP Error 503",
        "experiments/search failed: HTTP Error 503",
    ]


def test_status_table_columns():
    (report,) = replay_status(*probes(), address="10.0.0.5", facts={}, now=NOW)

    header, row = status_lines([{"host": "node1", **report}])

    assert header.split() == ["HOST", "REPLAY", "MOUNTS", "SNAPSHOT", "AGE", "SIZE", "STORE", "CHANGED",
                              "SERVER", "URL"]
    assert row.split() == ["node1", "demo", "metrics=active,artifacts=active", "2", "h", "3.0", "MiB", "no", "ok",
                           "http://10.0.0.5:8000/"]
