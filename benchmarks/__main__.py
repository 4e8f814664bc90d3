"""Run the mlflow-replay benchmark and write docs/benchmarks.md.

Usage, as root from the repository root:
    MLFLOW_REPLAY_BENCH_INDEX=7 .venv/bin/python -m benchmarks [--quick]

It boots its own bench (nodes, moto S3) like the test suite does, on the
bench index given in MLFLOW_REPLAY_BENCH_INDEX, and shuts it down at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# Kept equal to benchmarks.suite.PHASES, which imports the test bench and so is imported late.
PHASES = ("latency", "footprint", "transfer", "apply")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="stores of 20 and 500 runs only, and fewer repetitions")
    parser.add_argument("--output", type=Path, default=PROJECT_ROOT / "docs" / "benchmarks.md",
                        help="Markdown page to write (default: docs/benchmarks.md)")
    parser.add_argument("--results", type=Path, default=PROJECT_ROOT / "benchmarks" / "results.json",
                        help="JSON file for the raw measurements (default: benchmarks/results.json)")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="comma-separated phases to run, of " + ", ".join(PHASES) + " (default: all). "
                             "With fewer than all, the results of the other phases are kept from --results")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing; render --results into --output again")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    from benchmarks import report

    if not args.render_only:
        if "MLFLOW_REPLAY_BENCH_INDEX" not in os.environ:
            print("error: set MLFLOW_REPLAY_BENCH_INDEX (0-9) to the bench index this run may use",
                  file=sys.stderr)
            return 2
        if os.geteuid() != 0:
            print("error: the benchmark boots nodes and must run as root", file=sys.stderr)
            return 2
        from benchmarks.suite import run_suite

        command = "MLFLOW_REPLAY_BENCH_INDEX={} .venv/bin/python -m benchmarks{}".format(
            os.environ["MLFLOW_REPLAY_BENCH_INDEX"], " --quick" if args.quick else "")
        phases = tuple(name.strip() for name in args.phases.split(",") if name.strip())
        unknown = sorted(set(phases) - set(PHASES))
        if unknown:
            print(f"error: unknown phases {', '.join(unknown)}; choose from {', '.join(PHASES)}", file=sys.stderr)
            return 2
        earlier = _load(args.results) if set(phases) != set(PHASES) else {}
        if set(phases) != set(PHASES):
            command += f" --phases {','.join(phases)}"

        def save(partial: dict) -> None:
            _save(args.results, _merge(earlier, partial, phases))

        save(run_suite(args.quick, command, save, phases))
    results = json.loads(args.results.read_text(encoding="utf-8"))
    args.output.write_text(report.render(results), encoding="utf-8")
    print(f"wrote {args.output} and {args.results}")
    return 0 if not results.get("errors") else 1


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}


def _merge(earlier: dict, new: dict, phases: tuple[str, ...]) -> dict:
    """Return `new` with the phases it did not run taken from `earlier`, with their run's metadata."""
    merged = dict(new)
    merged["errors"] = {key: error for key, error in new.get("errors", {}).items()}
    kept = [key for key in PHASES if key not in phases and key in earlier]
    for key in kept:
        merged[key] = earlier[key]
        if key in earlier.get("errors", {}):
            merged["errors"][key] = earlier["errors"][key]
    if kept:
        merged["meta"] = {**new["meta"], "kept_from_earlier_run": {
            "phases": kept, "command": earlier["meta"]["command"], "started": earlier["meta"]["started"],
            "load": earlier["meta"]["load"]}}
    return merged


def _save(path: Path, results: dict) -> None:
    path.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
