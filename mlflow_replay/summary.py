"""End-of-run summary of runner.py: the text recap and the --json document."""

from __future__ import annotations

from mlflow_replay.progress import RECAP_COUNTERS, recap_lines

# Counters in the --json document, with the key of ansible-runner's stats.
JSON_COUNTERS = (("ok", "ok"), ("changed", "changed"), ("failed", "failures"),
                 ("unreachable", "dark"), ("skipped", "skipped"))


def host_counters(stats: dict) -> dict[str, dict[str, int]]:
    """Return {host: {counter: n}} from ansible-runner's stats."""
    hosts = sorted({host for _, key in RECAP_COUNTERS for host in (stats.get(key) or {})}
                   | set(stats.get("processed", {}) or {}))
    return {host: {name: (stats.get(key) or {}).get(host, 0) for name, key in JSON_COUNTERS} for host in hosts}


def replay_rows(custom_stats: dict) -> list[dict]:
    """Return one row per (host, replay) from the playbook's `replays` stats."""
    rows = []
    for host, reports in sorted((custom_stats.get("replays") or {}).items()):
        for report in reports:
            rows.append({"host": host, "name": report["name"], "urls": report["urls"],
                         "experiments": report.get("experiments", [])})
    return rows


def status_rows(custom_stats: dict) -> list[dict]:
    """Return one health report per (host, replay) from the status playbook's stats."""
    rows = []
    for host, reports in sorted((custom_stats.get("status") or {}).items()):
        for report in reports:
            rows.append({"host": host, **{k: v for k, v in report.items() if k != "summary"}})
    return rows


def build_document(command: str, result, failures: list[dict], elapsed: float, code: int,
                   log_path=None) -> dict:
    """Return the --json document of a finished run."""
    document = {
        "command": command,
        "exit_code": code,
        "elapsed_seconds": round(elapsed, 1),
        "hosts": host_counters(result.stats),
        "replays": replay_rows(result.custom_stats),
        "failures": failures,
        "log": str(log_path) if log_path else None,
    }
    if command == "status":
        document["status"] = status_rows(result.custom_stats)
    return document


def _age(seconds) -> str:
    if seconds is None:
        return "-"
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit}"
    return f"{seconds} s"


def _size(size) -> str:
    if size is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def status_lines(rows: list[dict]) -> list[str]:
    """Return a table of replay health, then one line per problem."""
    header = ("HOST", "REPLAY", "MOUNTS", "SNAPSHOT AGE", "SIZE", "STORE CHANGED", "SERVER", "URL")
    table = [header]
    for row in rows:
        mounts = ",".join(f"{kind}={state}" for kind, state in row["mounts"].items()) or "-"
        changed = {True: "yes", False: "no", None: "unknown"}[row["source"]["changed"]]
        server = "ok" if row["health"]["ok"] and row["search"]["ok"] else "FAILED"
        table.append((row["host"], row["name"], mounts, _age(row["snapshot"]["age_seconds"]),
                      _size(row["snapshot"]["bytes"]), changed, server, row["urls"][0]))
    widths = [max(len(str(line[i])) for line in table) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)).rstrip() for line in table]
    for row in rows:
        lines += [f"UNHEALTHY {row['host']} {row['name']}: {problem}" for problem in row["problems"]]
    return lines


def print_text(command: str, result, progress, elapsed: float, log_path=None, stream=None) -> None:
    """Print the recap, the failures, the replays' URLs and the elapsed time."""
    def say(text=""):
        print(text, file=stream, flush=True)

    if result.rc != 0 and not result.stats:
        # ansible-playbook stopped before it ran a play: show why.
        say("\nansible-playbook stopped before running any task:")
        say("\n".join(progress.messages[-40:]) or f"  exit status {result.rc}, no message")
    else:
        say("\nPLAY RECAP")
        for line in recap_lines(result.stats):
            say(line)
    for failure in progress.failures:
        say(f"\nFAILED on {failure['host']}, task '{failure['task']}':\n  {failure['message']}")
    rows = replay_rows(result.custom_stats)
    if rows:
        say("\nREPLAYS")
        width = max(len(f"{row['host']} {row['name']}") for row in rows)
        for row in rows:
            experiments = ", ".join(row["experiments"])
            say(f"  {(row['host'] + ' ' + row['name']).ljust(width)}  open {row['urls'][0]}"
                f"  ({len(row['experiments'])} experiments: {experiments})")
            for url in row["urls"][1:]:
                say(f"  {''.ljust(width)}  or   {url}")
    if command == "status":
        say("\nSTATUS")
        for line in status_lines(status_rows(result.custom_stats)) or ["  no replay found"]:
            say(line)
    if log_path:
        say(f"\nlog: {log_path}")
    say(f"finished in {elapsed:.0f} s")
