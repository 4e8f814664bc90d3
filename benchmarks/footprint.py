"""Resident memory of every process that belongs to one replay on its node.

A replay owns three systemd units (two rclone mounts and the MLflow server,
whose cgroup contains uvicorn and, with several workers, its worker processes). nginx, the guard,
is shared by all replays of a node and is listed on its own line.
"""

from __future__ import annotations

import statistics
import threading

from testbench.nodes import Node

from benchmarks import contestants
from benchmarks.environment import node_processes_of_units, node_rss_of_units
from benchmarks.viewer import time_requests


def replay_units(replay: str) -> list[str]:
    return [f"mlflow-replay-{replay}-{role}.service" for role in ("metrics", "artifacts", "server")] + [
        "nginx.service"]


def sample_idle(node: Node, replay: str) -> dict[str, int]:
    return node_rss_of_units(node, replay_units(replay))


def sample_while_browsing(node: Node, replay: str, port: int, requests: list[dict],
                          repetitions: int) -> dict[str, int]:
    """Return the peak resident bytes per unit, sampled every half second while pages load."""
    peaks: dict[str, int] = {}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for unit, size in node_rss_of_units(node, replay_units(replay)).items():
                peaks[unit] = max(peaks.get(unit, 0), size)
            done.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        time_requests(node, port, requests, repetitions, timeout=120)
    finally:
        done.set()
        sampler.join()
    return peaks


SERVER_VARIANTS = (("uvicorn", 1), ("uvicorn", 2), ("mlflow server", 1))


def measure_worker_counts(node: Node, replay: str, requests: list[dict], port: int,
                          variants: tuple[tuple[str, int], ...] = SERVER_VARIANTS) -> dict[str, dict]:
    """Serve a copy of the replay's snapshot per (launcher, workers). Return resident bytes and page time.

    The launchers are those of `contestants.start_sqlite`. Each server loads
    the page ten times first, so its workers have imported and cached what a
    browsing user makes them import.
    """
    measured = {}
    for launcher, workers in variants:
        unit = contestants.start_sqlite(node, replay, port, workers, launcher)
        try:
            timings = time_requests(node, port, requests, 10, timeout=120)
            processes = node_processes_of_units(node, [unit])
        finally:
            contestants.stop_units(node, [unit])
        page = sum(statistics.median(values) for values in timings.values())
        measured[f"{launcher}|{workers}"] = {"launcher": launcher, "workers": workers,
                                             "rss": sum(item["rss"] for item in processes),
                                             "page_seconds": page, "processes": processes}
    return measured
