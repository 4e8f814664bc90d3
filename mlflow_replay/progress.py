"""Live progress lines from Ansible events, and the final recap."""

from __future__ import annotations

import sys
import threading
import time

# Counters of Ansible's recap line, in Ansible's order, with the key under
# which ansible-runner's stats hold each.
RECAP_COUNTERS = (
    ("ok", "ok"),
    ("changed", "changed"),
    ("unreachable", "dark"),
    ("failed", "failures"),
    ("skipped", "skipped"),
    ("rescued", "rescued"),
    ("ignored", "ignored"),
)
HEARTBEAT_SECONDS = 30


class Progress:
    """Print one line per task and per host result as events arrive.

    Plain text only, so it reads the same in a terminal and in a CI log. A
    background thread prints a 'still running' line when a task has produced
    no event for HEARTBEAT_SECONDS (package installs, the snapshot import).
    """

    def __init__(self, stream=sys.stdout):
        self.stream = stream
        self.task = None
        self.task_started = time.monotonic()
        self.last_output = time.monotonic()
        self.failures: list[dict] = []
        # Output that ansible-playbook prints outside any task, such as a
        # syntax error that stops the run before its first task.
        self.messages: list[str] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info):
        self._stop.set()
        self._thread.join()

    def _print(self, line: str) -> None:
        with self._lock:
            print(line, file=self.stream, flush=True)
            self.last_output = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(5):
            idle = time.monotonic() - self.last_output
            if self.task and idle >= HEARTBEAT_SECONDS:
                elapsed = int(time.monotonic() - self.task_started)
                self._print(f"    ... still running: {self.task} ({elapsed} s)")

    def handle(self, event: dict) -> None:
        """Print what `event` (an ansible-runner event) tells the user."""
        kind = event.get("event", "")
        data = event.get("event_data", {})
        if kind == "playbook_on_task_start":
            self.task = data.get("task", "")
            self.task_started = time.monotonic()
            self._print(f"TASK {self.task}")
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable", "runner_on_skipped"):
            self._host_result(kind, data)
        elif kind in ("verbose", "error") and event.get("stdout", "").strip():
            self.messages.append(event["stdout"].rstrip())

    def _host_result(self, kind: str, data: dict) -> None:
        host = data.get("host", "?")
        result = data.get("res", {}) or {}
        if kind == "runner_on_skipped":
            return
        if kind == "runner_on_ok":
            state = "changed" if result.get("changed") else "ok"
        elif kind == "runner_on_unreachable":
            state = "UNREACHABLE"
        elif data.get("ignore_errors"):
            state = "failed (ignored)"
        else:
            state = "FAILED"
        self._print(f"  {host}: {state}")
        if state in ("FAILED", "UNREACHABLE"):
            self.failures.append({"host": host, "task": data.get("task", self.task), "message": failure_message(result)})


def failure_message(result: dict) -> str:
    """Return the one message that explains a failed module result."""
    if result.get("censored"):
        return result["censored"]
    for key in ("msg", "stderr", "reason"):
        value = result.get(key)
        if value:
            return str(value).strip()
    for item in result.get("results", []) or []:
        if item.get("failed"):
            return failure_message(item)
    return "the task failed without a message (rerun with -v)"


def recap_lines(stats: dict) -> list[str]:
    """Return Ansible-style recap lines, one per host, from runner stats."""
    hosts = sorted({host for _, key in RECAP_COUNTERS for host in (stats.get(key) or {})}
                   | set(stats.get("processed", {}) or {}))
    lines = []
    for host in hosts:
        counts = " ".join(f"{name}={(stats.get(key) or {}).get(host, 0)}" for name, key in RECAP_COUNTERS)
        lines.append(f"{host:<20} : {counts}")
    return lines
