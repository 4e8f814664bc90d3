"""Viewer latency: the calls the MLflow UI makes to open an experiment page and one run.

The client runs on the node itself (benchmarks/node_client.py), so every
contestant is measured over loopback on the same machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from testbench.nodes import Node

from benchmarks.environment import PublishedStore

CLIENT_PATH = "/var/tmp/bench-node-client.py"
API = "/ajax-api/2.0/mlflow"
# Runs visible in a chart by default; the UI requests at most 320 points per run and key.
VISIBLE_RUNS = 10
CHART_POINTS = 320


def ui_requests(store: PublishedStore) -> list[dict]:
    """Return the requests for one experiment page and one run page of `store`.

    The shapes follow what the MLflow 3.17.2 UI sends: a runs/search page of
    100 runs, newest first, and one sampled history request per chart.
    NOTE: the page size and order come from reading the UI's minified bundle,
    not from recording a browser's requests.
    """
    experiment_id = store.experiment_id
    run_ids = store.run_ids()
    chart_runs = "&".join(f"run_ids={run_id}" for run_id in run_ids[:VISIBLE_RUNS])
    first_run = run_ids[0]
    return [
        {"name": "experiments/get", "method": "GET",
         "path": f"{API}/experiments/get?experiment_id={experiment_id}"},
        {"name": "runs/search", "method": "POST", "path": f"{API}/runs/search",
         "body": {"experiment_ids": [experiment_id], "filter": "", "run_view_type": "ACTIVE_ONLY",
                  "max_results": 100, "order_by": ["attributes.start_time DESC"]}},
        {"name": "metrics/get-history-bulk-interval", "method": "GET",
         "path": f"{API}/metrics/get-history-bulk-interval?{chart_runs}&metric_key=loss"
                 f"&max_results={CHART_POINTS}"},
        {"name": "runs/get", "method": "GET", "path": f"{API}/runs/get?run_id={first_run}"},
        {"name": "artifacts/list", "method": "GET", "path": f"{API}/artifacts/list?run_id={first_run}"},
    ]


def install_client(node: Node) -> None:
    node.run(f"cat > {CLIENT_PATH}", input=(Path(__file__).parent / "node_client.py").read_text())


def time_requests(node: Node, port: int, requests: list[dict], repetitions: int, timeout: float,
                  skip_after_timeout: bool = False) -> dict[str, list[float | None]]:
    """Run the requests on the node against 127.0.0.1:PORT and return the seconds per request name."""
    spec = {"base": f"http://127.0.0.1:{port}", "requests": requests, "repetitions": repetitions,
            "timeout": timeout, "skip_after_timeout": skip_after_timeout}
    budget = (timeout + 5) * repetitions * len(requests) + 60
    result = node.run(["python3", CLIENT_PATH], input=json.dumps(spec), timeout=budget)
    return json.loads(result.stdout)


@dataclass
class Latency:
    """Cold and warm seconds of each request name for one contestant and store."""

    cold: dict[str, float | None] = field(default_factory=dict)
    warm: dict[str, list[float | None]] = field(default_factory=dict)

    def add_warm(self, timings: dict[str, list[float | None]]) -> None:
        for name, values in timings.items():
            self.warm.setdefault(name, []).extend(values)
