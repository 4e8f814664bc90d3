"""Render the benchmark results (a JSON-compatible dict) as the Markdown page docs/benchmarks.md."""

from __future__ import annotations

import statistics
from pathlib import Path

TEMPLATE = Path(__file__).with_name("page_template.md")
CONTESTANTS = ("replay", "sqlite", "seed")


def _seconds(value: float | None, timeout: float | None = None) -> str:
    if value is None:
        return f"> {timeout:.0f} s" if timeout else "timed out"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    return f"{value:.1f} s"


def _ratio(numerator: float | None, denominator: float | None, lower_bound: float | None = None) -> str:
    if denominator in (None, 0):
        return "-"
    if numerator is None:
        return f"> {lower_bound / denominator:.0f}x" if lower_bound else "-"
    ratio = numerator / denominator
    return f"{ratio:.2f}x" if ratio < 10 else f"{ratio:.0f}x"


def _median(values: list) -> float | None:
    if not values or any(value is None for value in values):
        return None
    return statistics.median(values)


def latency_table(latency: dict, seed_timeout: float) -> str:
    """Return one table per store: warm medians per call, page sums and ratios."""
    sections = []
    for runs, by_contestant in sorted(latency.items(), key=lambda item: int(item[0])):
        names = list(by_contestant["replay"]["warm"])
        lines = [
            f"#### {runs} runs",
            "",
            "| call | replay | SQLite copy (lower bound) | seed design | replay / SQLite | seed / replay |",
            "|---|---|---|---|---|---|",
        ]
        totals = {contestant: 0.0 for contestant in CONTESTANTS}
        for name in names:
            medians = {c: _median(by_contestant[c]["warm"].get(name, [])) for c in CONTESTANTS}
            for contestant, value in medians.items():
                totals[contestant] = None if value is None or totals[contestant] is None else totals[contestant] + value
            lines.append(
                f"| {name} | {_seconds(medians['replay'])} | {_seconds(medians['sqlite'])} | "
                f"{_seconds(medians['seed'], seed_timeout)} | {_ratio(medians['replay'], medians['sqlite'])} | "
                f"{_ratio(medians['seed'], medians['replay'], seed_timeout)} |"
            )
        lines.append(
            f"| **page, warm** | **{_seconds(totals['replay'])}** | **{_seconds(totals['sqlite'])}** | "
            f"**{_seconds(totals['seed'], seed_timeout)}** | **{_ratio(totals['replay'], totals['sqlite'])}** | "
            f"**{_ratio(totals['seed'], totals['replay'], seed_timeout)}** |"
        )
        cold = {}
        for contestant in CONTESTANTS:
            values = list(by_contestant[contestant]["cold"].values())
            cold[contestant] = None if any(value is None for value in values) else sum(values)
        lines.append(
            f"| page, cold | {_seconds(cold['replay'])} | {_seconds(cold['sqlite'])} | "
            f"{_seconds(cold['seed'], seed_timeout)} | {_ratio(cold['replay'], cold['sqlite'])} | "
            f"{_ratio(cold['seed'], cold['replay'], seed_timeout)} |"
        )
        rounds = len(by_contestant["replay"]["warm"][names[0]])
        seed_passes = len(by_contestant["seed"]["warm"][names[0]])
        lines += ["", f"Warm: median of {rounds} passes (replay and SQLite alternating) and "
                      f"{seed_passes} seed passes. Cold: one pass.", ""]
        sections.append("\n".join(lines))
    return "\n".join(sections)


def transfer_table(transfer: dict) -> str:
    """Return a table of import, refresh, raw copies and migration per store, with the target ratio."""
    sections = []
    for runs, seconds in sorted(transfer["results"].items(), key=lambda item: int(item[0])):
        # The script's own steps first, then the raw copies, fastest first.
        order = ["import", "refresh", "migrate-filestore"]
        order += sorted((name for name in seconds if name not in order), key=lambda name: statistics.median(seconds[name]))
        medians = {name: statistics.median(seconds[name]) for name in order}
        copies = {name: value for name, value in medians.items() if name.startswith("rclone copy")}
        fastest = min(copies, key=copies.get)
        bound = copies[fastest] + medians["migrate-filestore"]
        lines = [
            f"#### {runs} runs ({transfer['objects'][runs]} objects in the metrics bucket)",
            "",
            "| operation | median | runs |",
            "|---|---|---|",
        ]
        for name, value in medians.items():
            lines.append(f"| {name} | {_seconds(value)} | {len(seconds[name])} |")
        lines += [
            "",
            f"Import / (fastest raw copy, {fastest[len('rclone copy '):]}, + local migration): "
            f"**{_ratio(medians['import'], bound)}** (target 1.5x).",
            "",
        ]
        sections.append("\n".join(lines))
    return "\n".join(sections)


def apply_table(apply: dict, cpus: int) -> str:
    """Return the apply times on one and three nodes, with the three-node ratio."""
    lines = ["| case | 1 node | 3 nodes | 3 / 1 | changed tasks (1 node; 3 nodes) | runs |",
             "|---|---|---|---|---|---|"]
    cases = [key.rsplit("|", 1)[0] for key in apply["seconds"] if key.endswith("|1")]
    for case in cases:
        one, three = apply["seconds"][f"{case}|1"], apply["seconds"][f"{case}|3"]
        changed_one, changed_three = apply["changed"][f"{case}|1"], apply["changed"][f"{case}|3"]
        lines.append(
            f"| {case} | {_seconds(statistics.median(one))} | {_seconds(statistics.median(three))} | "
            f"{_ratio(statistics.median(three), statistics.median(one))} | "
            f"{'/'.join(map(str, changed_one))}; {'/'.join(map(str, changed_three))} | {len(one)} |"
        )
    if apply.get("node_cpu"):
        lines += ["", _cpu_table(apply, cases, cpus)]
    if apply.get("profile"):
        lines += ["", "Slowest tasks of one idempotent apply on three nodes with every role running (plain `ansible-playbook` with `ansible.posix.profile_tasks`, so no record):",
                  "", "```", *apply["profile"], "```"]
    return "\n".join(lines)


def _cpu_table(apply: dict, cases: list[str], cpus: int) -> str:
    """Return the CPU seconds per apply and the lowest three-node ratio that `cpus` shared cores allow.

    The nodes and the controller share the bench's cores, so three nodes cannot
    finish before their summed CPU time divided by the core count.
    """
    lines = ["CPU seconds per apply (medians): the controller (runner.py, Ansible, ssh) and the nodes. "
             f"The last column divides the three-node CPU seconds by the {cpus} cores that the nodes "
             "and the controller share, and by the one-node time: no three-node apply on this machine "
             "can have a lower 3 / 1 ratio.",
             "", "| case | controller, 1 node | nodes, 1 node | controller, 3 nodes | nodes, 3 nodes "
             f"| lowest 3 / 1 on {cpus} cores |", "|---|---|---|---|---|---|"]
    for case in cases:
        median = {(kind, count): statistics.median(apply[kind][f"{case}|{count}"])
                  for count in (1, 3) for kind in ("controller_cpu", "node_cpu", "seconds")}
        cells = [f"{median[(kind, count)]:.0f} s" for count in (1, 3) for kind in ("controller_cpu", "node_cpu")]
        busy = (median[("controller_cpu", 3)] + median[("node_cpu", 3)]) / cpus
        floor = max(busy, median[("seconds", 1)]) / median[("seconds", 1)]
        lines.append(f"| {case} | {' | '.join(cells)} | {floor:.2f}x |")
    return "\n".join(lines)


def footprint_table(footprint: dict) -> str:
    """Return resident memory per unit of one replay, idle and at the peak while browsing."""
    lines = ["| unit | idle | peak while browsing |", "|---|---|---|"]
    own_idle = own_peak = 0
    for unit, idle in footprint["idle"].items():
        peak = footprint["browsing"].get(unit, 0)
        lines.append(f"| {unit} | {idle / 2**20:.0f} MiB | {peak / 2**20:.0f} MiB |")
        if unit != "nginx.service":
            own_idle += idle
            own_peak += peak
    lines.append(f"| **the replay's own units** | **{own_idle / 2**20:.0f} MiB** | **{own_peak / 2**20:.0f} MiB** |")
    processes = footprint.get("processes_after_browsing")
    if processes:
        lines += ["", "Processes after browsing:", "", "| unit | resident | command line (first 120 characters) |",
                  "|---|---|---|"]
        lines += [f"| {item['unit']} | {item['rss'] / 2**20:.0f} MiB | `{item['command']}` |" for item in processes]
    by_workers = footprint.get("server_by_workers")
    if by_workers:
        lines += ["", "The same MLflow on the SQLite copy, by launcher and uvicorn worker count, after ten page loads:",
                  "", "| launcher | workers | processes | resident, all processes | page, warm median |",
                  "|---|---|---|---|---|"]
        lines += [f"| `{item.get('launcher', 'mlflow server')}` | {item.get('workers', key)} | "
                  f"{len(item.get('processes', []))} | {item['rss'] / 2**20:.0f} MiB | {_seconds(item['page_seconds'])} |"
                  for key, item in sorted(by_workers.items(), key=_launcher_order)]
    return "\n".join(lines)


def _launcher_order(entry: tuple[str, dict]) -> tuple[bool, int]:
    """Sort the replay's own launcher (uvicorn) first, then by worker count."""
    item = entry[1]
    return item.get("launcher", "mlflow server") != "uvicorn", int(item.get("workers", entry[0]))


def _section(results: dict, key: str, build, *arguments) -> str:
    if key not in results:
        error = results.get("errors", {}).get(key, "the run stopped before this phase")
        return f"Not measured in this run: {error}"
    return build(results[key], *arguments)


def _apply_cpus(results: dict) -> int:
    """Return the core count of the apply phase's machine; older results only name it in the machine line."""
    return int(results.get("apply", {}).get("cpus") or results["meta"]["machine"].split()[0])


def _errors_note(errors: dict) -> str:
    if not errors:
        return "none"
    return "".join(f"\n  - {key}: {' '.join(error.split())[:300]}" for key, error in errors.items())


def _kept_note(meta: dict) -> str:
    kept = meta.get("kept_from_earlier_run")
    if not kept:
        return "All phases ran in this run."
    return (f"The {', '.join(kept['phases'])} results come from an earlier run, started {kept['started']} "
            f"with `{kept['command']}` at a load average of {kept['load']}.")


def render(results: dict) -> str:
    """Return the whole page for `results`. A phase that failed shows its error instead of a table."""
    meta = results["meta"]
    return TEMPLATE.read_text(encoding="utf-8").format(
        command=meta["command"],
        started=meta["started"],
        elapsed_minutes=f"{meta['elapsed_seconds'] / 60:.0f}",
        machine=meta["machine"],
        load=meta["load"],
        latency=_section(results, "latency", latency_table, meta["seed_timeout"]),
        transfer=_section(results, "transfer", transfer_table),
        apply=_section(results, "apply", apply_table, _apply_cpus(results)),
        footprint=_section(results, "footprint", footprint_table),
        seed_timeout=f"{meta['seed_timeout']:.0f}",
        targets=targets_table(results),
        kept=_kept_note(meta),
        errors=_errors_note(results.get("errors", {})),
    )


def _page_medians(by_contestant: dict) -> dict[str, float | None]:
    totals = {}
    for contestant in CONTESTANTS:
        medians = [_median(values) for values in by_contestant[contestant]["warm"].values()]
        totals[contestant] = None if any(value is None for value in medians) else sum(medians)
    return totals


def targets_table(results: dict) -> str:
    """Return one row per target of the issue, with the measured value and whether it was met."""
    rows = []

    latency = results.get("latency", {}).get("500")
    if latency:
        pages = _page_medians(latency)
        ratio = pages["replay"] / pages["sqlite"]
        rows.append(("viewer page, 500 runs, warm: replay / SQLite copy", "at most 1.2x",
                     f"{ratio:.2f}x", ratio <= 1.2))
        seed = pages["seed"]
        timeout = results["meta"]["seed_timeout"]
        speedup = (seed if seed is not None else timeout) / pages["replay"]
        rows.append(("viewer page, 500 runs, warm: seed design / replay", "at least 100x",
                     f"{'> ' if seed is None else ''}{speedup:.0f}x", speedup >= 100))

    for runs, seconds in sorted(results.get("transfer", {}).get("results", {}).items(), key=lambda i: int(i[0])):
        medians = {name: statistics.median(values) for name, values in seconds.items()}
        fastest = min(value for name, value in medians.items() if name.startswith("rclone copy"))
        ratio = medians["import"] / (fastest + medians["migrate-filestore"])
        rows.append((f"import, {runs} runs: import / (raw copy + local migration)", "at most 1.5x",
                     f"{ratio:.2f}x", ratio <= 1.5))

    apply = results.get("apply")
    if apply:
        ratio = (statistics.median(apply["seconds"]["idempotent re-apply|3"])
                 / statistics.median(apply["seconds"]["idempotent re-apply|1"]))
        rows.append(("idempotent re-apply: 3 nodes / 1 node", "at most 1.3x", f"{ratio:.2f}x", ratio <= 1.3))

    memory = results.get("footprint")
    if memory:
        peak = sum(size for unit, size in memory["browsing"].items() if unit != "nginx.service")
        rows.append(("resident memory of one replay, peak while browsing", "at most 600 MB",
                     f"{peak / 1e6:.0f} MB", peak <= 600e6))

    lines = ["| target | goal | measured | met |", "|---|---|---|---|"]
    lines += [f"| {name} | {goal} | {value} | {'yes' if met else '**no**'} |" for name, goal, value, met in rows]
    return "\n".join(lines)
