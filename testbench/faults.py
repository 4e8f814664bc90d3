"""Faults the tests inject into the bench, and a watch on the viewer while they last.

moto keeps its buckets in memory, so stopping the server would lose the store.
An outage is simulated instead with a firewall rule inside the server's network
namespace, which leaves moto and its data untouched.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from dataclasses import dataclass
from typing import Iterator

from testbench.host import run

# "reject" resets every new connection, as a stopped server does. "drop"
# discards packets, as an unreachable host does, so clients time out.
OUTAGE_ACTIONS = {
    "reject": ["-j", "REJECT", "--reject-with", "tcp-reset"],
    "drop": ["-j", "DROP"],
}


def _rule(port: int, mode: str) -> list[str]:
    if mode not in OUTAGE_ACTIONS:
        raise ValueError(f"unknown outage mode {mode!r}: use one of {sorted(OUTAGE_ACTIONS)}")
    return ["INPUT", "-p", "tcp", "--dport", str(port), *OUTAGE_ACTIONS[mode]]


def start_outage(netns: str, port: int, mode: str = "reject") -> None:
    """Make the server on `port` in `netns` unreachable until `end_outage`."""
    run(["ip", "netns", "exec", netns, "iptables", "-I", *_rule(port, mode)])


def end_outage(netns: str, port: int, mode: str = "reject") -> None:
    """Remove the rule that `start_outage` added. Does nothing when it is absent."""
    rule = _rule(port, mode)
    while run(["ip", "netns", "exec", netns, "iptables", "-C", *rule], check=False).returncode == 0:
        run(["ip", "netns", "exec", netns, "iptables", "-D", *rule])


@contextlib.contextmanager
def endpoint_outage(netns: str, port: int, mode: str = "reject") -> Iterator[None]:
    """Keep the server on `port` in `netns` unreachable inside the `with` block."""
    start_outage(netns, port, mode)
    try:
        yield
    finally:
        end_outage(netns, port, mode)


# --- watching a viewer while a fault happens ------------------------------

@dataclass
class Probe:
    """One look at a viewer, as the UI's first page and a run's artifact tab make it."""

    at: float  # time.monotonic() when the probe started
    experiments: int | None  # experiments listed, or None when the search failed
    artifacts: int | None  # files listed for the probed run, or None when the listing failed
    error: str | None

    def full(self, expected_experiments: int) -> bool:
        """Return whether this probe saw every experiment and a non-empty artifact listing."""
        return self.experiments == expected_experiments and bool(self.artifacts)


def _get_json(url: str, timeout: float) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


def probe_viewer(viewer_url: str, run_id: str, timeout: float = 5) -> Probe:
    """Search the experiments and list `run_id`'s artifacts once; a failed request is stored in the probe's error, not raised."""
    started = time.monotonic()
    experiments = artifacts = error = None
    try:
        found = _get_json(f"{viewer_url}/api/2.0/mlflow/experiments/search?max_results=1000&view_type=ALL", timeout)
        experiments = len(found.get("experiments", []))
    except (OSError, ValueError) as failure:
        error = f"experiments search: {failure}"
    try:
        listed = _get_json(f"{viewer_url}/api/2.0/mlflow/artifacts/list?run_id={run_id}", timeout)
        artifacts = len(listed.get("files", []))
    except (OSError, ValueError) as failure:
        error = f"{error + '; ' if error else ''}artifact listing: {failure}"
    return Probe(started, experiments, artifacts, error)


class ViewerWatch:
    """Probe a viewer in a background thread, as a user keeps the UI open, until `stop()`."""

    def __init__(self, viewer_url: str, run_id: str, interval: float = 0.5):
        self.viewer_url = viewer_url
        self.run_id = run_id
        self.interval = interval
        self.probes: list[Probe] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> ViewerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.probes.append(probe_viewer(self.viewer_url, self.run_id))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def between(self, start: float, end: float) -> list[Probe]:
        """Return the probes that started between the monotonic times `start` and `end`."""
        return [probe for probe in self.probes if start <= probe.at <= end]


def wait_for_full_viewer(viewer_url: str, run_id: str, expected_experiments: int, timeout: float) -> float:
    """Probe until the viewer lists every experiment and `run_id`'s artifacts; return the monotonic time.

    Raises TimeoutError with the last probe's error after `timeout` seconds.
    """
    deadline = time.monotonic() + timeout
    while True:
        probe = probe_viewer(viewer_url, run_id)
        if probe.full(expected_experiments):
            return probe.at
        if time.monotonic() > deadline:
            raise TimeoutError(f"viewer {viewer_url} not serving the full store after {timeout} s: {probe}")
        time.sleep(0.5)
