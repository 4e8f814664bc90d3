"""Health of each replay on a node, from the read-only probes of the replay_status role."""

from __future__ import annotations

import json
import time

# Parts of the errors that rclone (Go's net and http packages) prints when no
# S3 endpoint responds at all, as opposed to one that responds with an error
# such as a missing bucket or rejected credentials.
UNREACHABLE_MARKERS = (
    "connection refused",
    "connection reset by peer",
    "i/o timeout",
    "no route to host",
    "network is unreachable",
    "no such host",
    "context deadline exceeded",
    "tls handshake timeout",
)


def node_addresses(address: str, facts: dict) -> list[str]:
    """Return the addresses for a replay's URL.

    An empty `address` means the node is the control host: its own IPv4
    addresses are used (never an outside IP-lookup service).
    """
    if address:
        return [address]
    addresses = [a for a in dict(facts or {}).get("all_ipv4_addresses", []) if not a.startswith("127.")]
    return addresses or ["127.0.0.1"]


def _source_state(result: dict) -> dict:
    """Parse the JSON line of `import-snapshot --check-only`, or report why it failed.

    `unreachable` is true when the listing failed because no endpoint responded.
    """
    if result.get("rc") == 0:
        try:
            report = json.loads(result.get("stdout", "").strip().splitlines()[-1])
            return {"changed": bool(report.get("source_changed")), "objects": report.get("objects"), "error": None,
                    "unreachable": False}
        except (IndexError, ValueError):
            pass
    if not result.get("stderr") and result.get("msg") == "Error executing command.":
        # The command module could not start the script's Python.
        return {"changed": None, "objects": None, "unreachable": False,
                "error": "the import script or MLflow is not installed on the node (run apply)"}
    message = (result.get("stderr") or result.get("msg") or "no output").strip().splitlines()
    error = message[-1] if message else "no output"
    unreachable = any(marker in error.lower() for marker in UNREACHABLE_MARKERS)
    return {"changed": None, "objects": None, "error": error, "unreachable": unreachable}


def _http_state(result: dict) -> dict:
    status = result.get("status", -1)
    if status == 200:
        return {"ok": True, "status": status, "error": None}
    # The uri module prefixes the message of a failed request with "Status
    # code was <status> and not [200]: ", and reports status -1 when the
    # connection itself failed.
    message = str(result.get("msg") or f"status {status}")
    message = message.split("]: ", 1)[1] if message.startswith("Status code was") and "]: " in message else message
    return {"ok": False, "status": status, "error": message}


def replay_status(replays, mounts, snapshots, sources, health, experiments, address, facts, now=None) -> list[dict]:
    """Return one health report per replay.

    The lists after `replays` are the registered loop results of the
    replay_status role: `mounts` has one result per (replay, mount), the
    others one per replay, in the order of `replays`.
    """
    now = time.time() if now is None else now
    addresses = node_addresses(address, facts)
    mount_states: dict[str, dict[str, str]] = {}
    for result in mounts:
        replay, mount = result["item"]
        state = (result.get("stdout") or "").strip() or "unknown"
        mount_states.setdefault(replay["name"], {})[mount["kind"]] = state

    reports = []
    for replay, snapshot, source, server, search in zip(replays, snapshots, sources, health, experiments):
        stat = snapshot.get("stat", {}) or {}
        snapshot_state = {"exists": bool(stat.get("exists")), "bytes": None, "age_seconds": None}
        imported_at = None
        if stat.get("exists"):
            snapshot_state["bytes"] = stat.get("size")
            snapshot_state["age_seconds"] = max(0, int(now - stat.get("mtime", now)))
            # The import writes a new file and renames it into place, so its
            # modification time is the time of the import.
            imported_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(stat.get("mtime", now)))
        search_state = _http_state(search)
        names = sorted(e.get("name", "") for e in (search.get("json") or {}).get("experiments", []))
        search_state["experiments"] = names if search_state["ok"] else None
        report = {
            "name": replay["name"],
            "port": replay["port"],
            "endpoint": replay.get("endpoint"),
            "urls": [f"http://{host}:{replay['port']}/" for host in addresses],
            "mounts": mount_states.get(replay["name"], {}),
            "snapshot": snapshot_state,
            "snapshot_imported_at": imported_at,
            "source": _source_state(source),
            "health": _http_state(server),
            "search": search_state,
        }
        report["problems"] = problems(report)
        report["healthy"] = not report["problems"]
        report["summary"] = summary(report)
        reports.append(report)
    return reports


def problems(report: dict) -> list[str]:
    """Return what is wrong with a replay, as short sentences; empty when healthy."""
    found = [f"mount {kind} is {state}" for kind, state in report["mounts"].items() if state != "active"]
    if not report["snapshot"]["exists"]:
        found.append("no snapshot imported")
    if report["source"]["unreachable"]:
        found.append(_unreachable_problem(report))
    elif report["source"]["error"]:
        found.append(f"listing the store failed: {report['source']['error']}")
    for check, endpoint in (("health", "/health"), ("search", "experiments/search")):
        if not report[check]["ok"]:
            found.append(f"{endpoint} failed: {report[check]['error']}")
    return found


def _unreachable_problem(report: dict) -> str:
    """Describe an endpoint that does not respond, and whether the viewer still serves its snapshot."""
    error = report["source"]["error"]
    # rclone's message wraps the network error of Go's net package in the S3
    # request that failed; that error alone describes the failure.
    if "dial tcp " in error:
        error = error[error.index("dial tcp "):]
    problem = f"endpoint unreachable: {report['endpoint'] or 'the S3 endpoint'} ({error})"
    if report["snapshot"]["exists"] and report["health"]["ok"] and report["search"]["ok"]:
        problem += f"; the viewer still serves the snapshot of {report['snapshot_imported_at']}"
    return problem


def summary(report: dict) -> str:
    """Return one line describing a replay's health."""
    if report["healthy"]:
        changed = " (store changed since import: rerun apply)" if report["source"]["changed"] else ""
        return f"replay {report['name']}: healthy, {report['urls'][0]}{changed}"
    return f"replay {report['name']}: UNHEALTHY: {'; '.join(report['problems'])}"
