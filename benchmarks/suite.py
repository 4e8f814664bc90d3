"""The benchmark's phases in order, collecting their results into one JSON-compatible dict."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import contestants, footprint
from benchmarks.applytime import measure_apply, profile_idempotent_apply
from benchmarks.environment import BenchEnvironment, node_processes_of_units, replay_entry
from benchmarks.latency import SQLITE_PORT, LatencyPlan, measure_store
from benchmarks.transfer import measure_transfer
from benchmarks.viewer import install_client, ui_requests

log = logging.getLogger(__name__)

VIEWER_NODE = ("viewer", 11)
ONE_NODE = [("single", 25)]
THREE_NODES = [("trio1", 21), ("trio2", 22), ("trio3", 23)]
FIRST_PORT = 8000
# The replay's default worker count, used for the SQLite lower bound too.
WORKERS = 1


def machine_description() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), "unknown CPU")
    memory_kib = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal:")))
    system = next((line.split("=", 1)[1].strip('"') for line in Path("/etc/os-release").read_text().splitlines()
                   if line.startswith("PRETTY_NAME=")), "unknown system")
    return (f"{os.cpu_count()} vCPUs ({cpu}), {memory_kib / 2**20:.1f} GiB RAM, {system}, "
            f"Linux {platform.release()}")


def load_average() -> str:
    return " / ".join(f"{value:.1f}" for value in os.getloadavg())


PHASES = ("latency", "footprint", "transfer", "apply")


def _set_up_viewer(environment: BenchEnvironment, stores: dict, results: dict):
    """Boot the viewer node, apply one replay per store on it, and return the node, ports and idle memory."""
    viewer, = environment.boot([VIEWER_NODE])
    entries = [replay_entry(store, FIRST_PORT + index) for index, store in enumerate(stores.values())]
    ports = {runs: FIRST_PORT + index for index, runs in enumerate(stores)}
    viewer_files = environment.write_replay_files("viewer", [viewer], entries, workers=WORKERS)
    first_apply = environment.runner("apply", *viewer_files)
    results["meta"]["viewer_cold_apply_seconds"] = round(first_apply.seconds)
    results["meta"]["load_after_setup"] = load_average()
    install_client(viewer)
    # Let the servers settle after their start before the idle sample.
    time.sleep(10)
    return viewer, ports, footprint.sample_idle(viewer, stores[500].name)


def run_suite(quick: bool, command: str, save_partial, phases: tuple[str, ...] = PHASES) -> dict:
    """Run the selected phases. A failed phase records its error under "errors", and the others still run."""
    sizes = [20, 500] if quick else [20, 500, 2000]
    seed_timeout = 300.0
    results: dict = {"meta": {"command": command, "quick": quick, "seed_timeout": seed_timeout,
                              "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                              "machine": machine_description(), "load": load_average()},
                     "errors": {}}
    started = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="mlflow-replay-benchmark-", dir="/var/tmp"))
    environment = BenchEnvironment(work_dir)

    def phase(key: str, function) -> None:
        if key not in phases and key != "seed_install":
            return
        log.info("phase %s starts", key)
        phase_started = time.monotonic()
        try:
            results[key] = function()
        except Exception as error:  # noqa: BLE001 - a failed phase must not hide the others' numbers.
            log.error("phase %s failed: %s", key, error)
            results["errors"][key] = f"{type(error).__name__}: {str(error)[:500]}"
            traceback.print_exc()
        results["meta"].setdefault("phase_seconds", {})[key] = round(time.monotonic() - phase_started)
        results["meta"]["elapsed_seconds"] = time.monotonic() - started
        save_partial(results)

    try:
        environment.start()
        needs_viewer = bool(set(phases) - {"apply"})
        if not needs_viewer:
            sizes = [20]
        single = environment.boot(ONE_NODE) if "apply" in phases else []
        trio = environment.boot(THREE_NODES) if "apply" in phases else []
        stores = {runs: environment.publish(runs) for runs in sizes}
        if needs_viewer:
            viewer, ports, idle = _set_up_viewer(environment, stores, results)
        if "latency" in phases:
            phase("seed_install", lambda: contestants.install_seed_mlflow(viewer) or True)

        plan = LatencyPlan(rounds=8 if quick else 20, seed_passes=2 if quick else 3,
                           seed_timeout=seed_timeout, workers=WORKERS)

        def latency() -> dict:
            return {str(runs): {name: dataclasses.asdict(value)
                                for name, value in measure_store(viewer, store, ports[runs], plan).items()}
                    for runs, store in stores.items()}

        phase("latency", latency)

        def memory() -> dict:
            store = stores[500]
            browsing = footprint.sample_while_browsing(viewer, store.name, ports[500], ui_requests(store),
                                                       repetitions=10)
            processes = node_processes_of_units(viewer, footprint.replay_units(store.name))
            by_workers = footprint.measure_worker_counts(viewer, store.name, ui_requests(store), SQLITE_PORT)
            return {"idle": idle, "browsing": browsing, "processes_after_browsing": processes,
                    "server_by_workers": by_workers}

        phase("footprint", memory)

        def transfer() -> dict:
            big = {runs: store for runs, store in stores.items() if runs >= 500}
            return {
                "objects": {str(runs): store.objects for runs, store in big.items()},
                "results": {str(runs): measure_transfer(viewer, environment.s3, store, store.name,
                                                        repetitions=2 if quick else 3, quick=quick).seconds
                            for runs, store in big.items()},
            }

        phase("transfer", transfer)

        def apply() -> dict:
            times = measure_apply(environment, stores[20], single, trio, repetitions=3 if quick else 5)
            profile = profile_idempotent_apply(environment, *environment.write_replay_files(
                "apply-3", trio, [replay_entry(stores[20], FIRST_PORT)], workers=WORKERS))
            measured = {name: {f"{case}|{count}": values for (case, count), values in getattr(times, name).items()}
                        for name in ("seconds", "changed", "controller_cpu", "node_cpu")}
            return {**measured, "profile": profile, "cpus": os.cpu_count()}

        phase("apply", apply)
    except Exception as error:  # noqa: BLE001 - keep the phases measured before the failure.
        log.error("setup failed: %s", error)
        results["errors"]["setup"] = f"{type(error).__name__}: {str(error)[:500]}"
        traceback.print_exc()
    finally:
        results["meta"]["elapsed_seconds"] = time.monotonic() - started
        results["meta"]["load_at_end"] = load_average()
        environment.close()
    return results
