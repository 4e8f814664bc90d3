"""Measure the three viewer contestants on one store, side by side on one node."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from testbench.nodes import Node

from benchmarks import contestants
from benchmarks.environment import PublishedStore
from benchmarks.viewer import Latency, time_requests, ui_requests

log = logging.getLogger(__name__)

# Loopback ports on the node for the two comparison servers.
SQLITE_PORT = 19500
SEED_PORT = 19600


@dataclass
class LatencyPlan:
    """How many times to measure: warm rounds of the replay and SQLite, warm passes of the seed."""

    rounds: int
    seed_passes: int
    seed_timeout: float
    workers: int


def _measure_cold(node: Node, port: int, requests: list[dict], timeout: float, latency: Latency) -> None:
    timings = time_requests(node, port, requests, 1, timeout, skip_after_timeout=True)
    latency.cold = {name: values[0] for name, values in timings.items()}


def measure_store(node: Node, store: PublishedStore, replay_port: int, plan: LatencyPlan) -> dict[str, Latency]:
    """Return the latencies of replay, sqlite and seed for the UI calls on `store`.

    Cold means the first pass after the server (and, for the seed, its
    mounts) started. The replay and SQLite alternate pass by pass, so both
    see the same load from the rest of the machine.
    """
    requests = ui_requests(store)
    results = {"replay": Latency(), "sqlite": Latency(), "seed": Latency()}

    node.run(f"systemctl restart mlflow-replay-{store.name}-server.service")
    contestants.wait_healthy(node, replay_port + 10000)
    _measure_cold(node, replay_port, requests, 60, results["replay"])
    sqlite_unit = contestants.start_sqlite(node, store.name, SQLITE_PORT, plan.workers)
    try:
        _measure_cold(node, SQLITE_PORT, requests, 60, results["sqlite"])
        for _ in range(plan.rounds):
            results["replay"].add_warm(time_requests(node, replay_port, requests, 1, 60))
            results["sqlite"].add_warm(time_requests(node, SQLITE_PORT, requests, 1, 60))
    finally:
        contestants.stop_units(node, [sqlite_unit])

    seed_units = contestants.start_seed(node, store.name, store.metrics_bucket,
                                        store.manifest.artifacts_bucket, SEED_PORT,
                                        worker_timeout=int(plan.seed_timeout) + 60)
    try:
        _measure_seed(node, requests, plan, seed_units[-1], results["seed"])
        log.info("seed on %d runs: cold %s", store.runs, results["seed"].cold)
    finally:
        contestants.stop_units(node, seed_units)
    return results


def _measure_seed(node: Node, requests: list[dict], plan: LatencyPlan, server_unit: str,
                  latency: Latency) -> None:
    """Time the seed call by call; after a timeout, restart its server and skip that call from then on.

    The restart matters because the single worker goes on computing the
    abandoned response, and every later call would queue behind it.
    """
    timed_out = set()
    for repetition in range(1 + plan.seed_passes):
        for request in requests:
            name = request["name"]
            if name in timed_out:
                latency.warm.setdefault(name, []).append(None)
                continue
            seconds = time_requests(node, SEED_PORT, [request], 1, plan.seed_timeout)[name][0]
            if repetition == 0:
                latency.cold[name] = seconds
            else:
                latency.warm.setdefault(name, []).append(seconds)
            if seconds is None:
                timed_out.add(name)
                node.run(f"systemctl restart {server_unit}")
                contestants.wait_healthy(node, SEED_PORT)
