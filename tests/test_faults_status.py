"""What `runner.py status` reports while the S3 endpoint does not respond.

The probes are registered results shaped as Ansible returns them. The
end-to-end case, a real outage of the bench's S3 server, is in
test_faults_native.
"""

from __future__ import annotations

import json

from mlflow_replay.status import replay_status
from mlflow_replay.summary import status_lines

REPLAY = {"name": "demo", "port": 8000, "endpoint": "http://10.213.5.2:9000"}
MOUNTS = [{"kind": "metrics"}, {"kind": "artifacts"}]
NOW = 1_000_000.0
# 1_000_000 - 7200 seconds after the epoch.
IMPORTED_AT = "1970-01-12 11:46 UTC"
REFUSED = (
    "import-snapshot: listing store:published-mlruns failed (exit 1): Failed to lsf: RequestError: send request "
    'failed caused by: Get "http://10.213.5.2:9000/published-mlruns": dial tcp 10.213.5.2:9000: connect: '
    "connection refused"
)


def probes(source_error: str, server_ok: bool = True):
    """Return the registered results of the replay_status role for a failed store listing."""
    mounts = [{"item": [REPLAY, mount], "stdout": "active"} for mount in MOUNTS]
    stat = {"exists": True, "size": 2**20, "mtime": NOW - 7200}
    source = {"rc": 1, "stderr": source_error}
    if server_ok:
        health = {"status": 200, "msg": "OK"}
        search = dict(health, json={"experiments": [{"name": "a"}]})
    else:
        health = {"status": -1, "msg": "Status code was -1 and not [200]: Request failed: <urlopen error refused>"}
        search = dict(health, json=None)
    return [REPLAY], mounts, [{"stat": stat}], [source], [health], [search]


def test_outage_names_endpoint_and_snapshot():
    (report,) = replay_status(*probes(REFUSED), address="10.213.5.55", facts={}, now=NOW)

    assert report["healthy"] is False
    assert report["source"]["unreachable"] is True
    assert report["snapshot_imported_at"] == IMPORTED_AT
    (problem,) = report["problems"]
    assert problem.startswith(
        "endpoint unreachable: http://10.213.5.2:9000 (dial tcp 10.213.5.2:9000: connect: connection refused)"
    )
    assert problem.endswith(f"; the viewer still serves the snapshot of {IMPORTED_AT}")


def test_outage_line_in_status_table():
    (report,) = replay_status(*probes(REFUSED), address="10.213.5.55", facts={}, now=NOW)

    lines = status_lines([{"host": "node1", **report}])

    assert lines[-1].startswith("UNHEALTHY node1 demo: endpoint unreachable: http://10.213.5.2:9000")
    assert lines[-1].endswith(f"the viewer still serves the snapshot of {IMPORTED_AT}")


def test_outage_with_server_down_claims_no_snapshot():
    (report,) = replay_status(*probes(REFUSED, server_ok=False), address="10.213.5.55", facts={}, now=NOW)

    assert report["problems"][0].startswith("endpoint unreachable: ")
    assert "still serves" not in report["problems"][0]
    assert report["problems"][1:] == [
        "/health failed: Request failed: <urlopen error refused>",
        "experiments/search failed: Request failed: <urlopen error refused>",
    ]


def test_listing_error_with_answering_endpoint():
    error = "import-snapshot: listing store:published-mlruns failed (exit 3): directory not found"

    (report,) = replay_status(*probes(error), address="10.213.5.55", facts={}, now=NOW)

    assert report["source"]["unreachable"] is False
    assert report["problems"] == [f"listing the store failed: {error}"]


def test_outage_in_json_report():
    (report,) = replay_status(*probes(REFUSED), address="10.213.5.55", facts={}, now=NOW)

    document = json.loads(json.dumps(report))

    assert document["endpoint"] == "http://10.213.5.2:9000"
    assert document["source"]["unreachable"] is True
