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

    def __init__(self, stream=sys.stdout, log=None, show_diff=False):
        # stream None prints nothing (--json); `log` (a RunLog) receives
        # Ansible's full display output whatever the stream. With show_diff
        # (--diff), file diffs and debug messages are printed as Ansible
        # displays them, scrubbed by `log` like the log itself.
        self.stream = stream
        self.log = log
        self.show_diff = show_diff
        # (host, task uuid) of loop tasks with at least one changed item.
        self._changed_items: set[tuple[str, str]] = set()
        self.task = None
        self.task_started = time.monotonic()
        self.last_output = time.monotonic()
        self.failures: list[dict] = []
        # Hosts on which at least one task started: after an interruption,
        # these are the hosts that may be half-applied.
        self.hosts_started: set[str] = set()
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
            if self.stream is not None:
                print(line, file=self.stream, flush=True)
            self.last_output = time.monotonic()

    def _heartbeat(self) -> None:
        while not self._stop.wait(5):
            idle = time.monotonic() - self.last_output
            if self.task and idle >= HEARTBEAT_SECONDS:
                elapsed = int(time.monotonic() - self.task_started)
                self._print(f"    ... still running: {self.task} ({elapsed} s)")

    def handle(self, event: dict) -> None:
        """Print the progress line, if any, for `event` (an ansible-runner event)."""
        kind = event.get("event", "")
        data = event.get("event_data", {})
        if self.log is not None and event.get("stdout"):
            self.log.write(event["stdout"])
        if kind == "runner_on_start":
            self.hosts_started.add(data.get("host", "?"))
        if kind == "runner_item_on_ok" and _reports_changed(event):
            self._changed_items.add((data.get("host", "?"), data.get("task_uuid", "")))
        if kind == "playbook_on_task_start":
            self.task = data.get("task", "")
            self.task_started = time.monotonic()
            self._print(f"TASK {self.task}")
        elif kind in ("runner_on_ok", "runner_on_failed", "runner_on_unreachable", "runner_on_skipped"):
            self._host_result(kind, event)
        elif kind in ("verbose", "error") and event.get("stdout", "").strip():
            self.messages.append(event["stdout"].rstrip())
        if self.show_diff and (kind == "runner_on_file_diff"
                               or kind in ("runner_on_ok", "runner_item_on_ok") and _is_debug(data)):
            self._print_detail(event.get("stdout") or "")

    def _host_result(self, kind: str, event: dict) -> None:
        data = event.get("event_data", {})
        host = data.get("host", "?")
        result = data.get("res", {}) or {}
        if kind == "runner_on_skipped":
            return
        if kind == "runner_on_ok":
            changed = _reports_changed(event) or (host, data.get("task_uuid", "")) in self._changed_items
            state = "changed" if changed else "ok"
        elif kind == "runner_on_unreachable":
            state = "UNREACHABLE"
        elif data.get("ignore_errors"):
            state = "failed (ignored)"
        else:
            state = "FAILED"
        self._print(f"  {host}: {state}")
        if state in ("FAILED", "UNREACHABLE"):
            self.failures.append({"host": host, "task": data.get("task", self.task), "message": failure_message(result)})

    def _print_detail(self, text: str) -> None:
        if self.log is not None:
            text = self.log.scrub(text)
        for line in text.rstrip().splitlines():
            self._print(f"    {line}")


def _is_debug(event_data: dict) -> bool:
    """Return whether an event comes from a debug task, whose message --diff prints."""
    return event_data.get("task_action") in ("debug", "ansible.builtin.debug")


def _reports_changed(event: dict) -> bool:
    """Return whether a host or item result event reports a change.

    ansible-runner replaces the result of a `no_log: true` task by
    {"censored": ...} and so drops its "changed" key. Ansible's own display
    line ("changed: [host] ...") still contains the state, and no secret.
    """
    result = (event.get("event_data", {}) or {}).get("res", {}) or {}
    if result.get("changed"):
        return True
    return (event.get("stdout") or "").lstrip().startswith("changed:")


def failure_message(result: dict) -> str:
    """Return the one message that explains a failed module result.

    For a loop task, the first failed item's message, with its label: the
    task's own message only states that an item failed. A `no_log: true`
    result has no message: the output is hidden, and the returned message states that.
    """
    if result.get("censored"):
        return "output hidden because the task sets no_log: true (rerun the playbook without no_log to debug)"
    for item in result.get("results", []) or []:
        if isinstance(item, dict) and item.get("failed"):
            label = item.get("_ansible_item_label", item.get("item"))
            message = failure_message(item)
            return f"item {label}: {message}" if label is not None and not item.get("censored") else message
    for key in ("msg", "stderr", "reason"):
        value = result.get(key)
        if value:
            return str(value).strip()
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
