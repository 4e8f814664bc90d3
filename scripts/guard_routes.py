#!/usr/bin/env python3
"""Derive the read-only guard's allowlist from the installed MLflow's route table.

The guard (role replay_guard) passes only the routes listed under `reads` in
roles/replay_guard/files/read_routes.yml and rejects every other request. This
script walks the Flask `url_map` and the FastAPI routes of `mlflow.server` and
classifies each method and path:

- GET (and HEAD with it) is a read, except below the prefixes in
  EXCLUDED_PREFIXES.
- POST is a read only for the Flask endpoints in READ_ONLY_POST_ENDPOINTS,
  which search or batch-get without writing.
- Every other method (POST, PUT, PATCH, DELETE) is rejected. OPTIONS is left
  out: Flask adds it to every rule, and the UI is served from the same origin,
  so it never needs a CORS preflight.

Usage, with the MLflow version that the nodes run:
    python scripts/guard_routes.py            # rewrite the data file
    python scripts/guard_routes.py --check    # exit 1 when it is out of date
Review the diff of the data file after an MLflow upgrade before committing it.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

import yaml

DATA_FILE = Path(__file__).resolve().parent.parent / "roles/replay_guard/files/read_routes.yml"

# Marker static prefix: a route whose path starts with it moves with MLflow's
# --static-prefix, the others (such as the FastAPI artifact upload) do not.
PREFIX_MARKER = "/static-prefix-marker"

# Flask endpoint names whose POST only reads: searches, batch gets and the
# GraphQL endpoint (its resolvers in MLflow 3.17 only read).
READ_ONLY_POST_ENDPOINTS = frozenset({
    "_search_experiments",
    "_search_runs",
    "serve_search_datasets",
    "_search_logged_models",
    "_search_traces_v3",
    "_batch_get_trace_infos",
    "_query_trace_metrics",
    "_search_issues",
    "_search_evaluation_datasets_handler",
    "_search_prompt_optimization_jobs",
    "_get_latest_versions",
    "_graphql",
})

# GET routes that the guard rejects. The AI assistant trusts loopback clients,
# and every request through the proxy comes from loopback. A viewer has no use for it.
EXCLUDED_PREFIXES = ("/ajax-api/3.0/mlflow/assistant/",)

READ_METHODS = frozenset({"GET", "HEAD"})
IGNORED_METHODS = frozenset({"OPTIONS", "HEAD"})

# A Flask parameter <converter:name> or a FastAPI parameter {name:converter},
# the converter optional in both. Groups 1 and 2 are the converters.
ROUTE_PARAMETER = re.compile(r"<(?:([a-z]+)(?:\([^)]*\))?:)?\w+>|\{\w+(?::(\w+))?\}")


def _parameter_regex(converter: str | None) -> str:
    if converter == "path":
        return ".+"
    if converter == "int":
        return "[0-9]+"
    return "[^/]+"


def path_regex(path: str) -> str:
    """Return an unanchored regular expression for a Flask or FastAPI route path."""
    parts = []
    position = 0
    for match in ROUTE_PARAMETER.finditer(path):
        parts.append(re.escape(path[position:match.start()]))
        parts.append(_parameter_regex(match.group(1) or match.group(2)))
        position = match.end()
    parts.append(re.escape(path[position:]))
    # PCRE, which nginx uses, reads Python's escapes the same way.
    return "".join(parts)


def _fastapi_routes(app) -> list[tuple[str, str, str]]:
    """Return (method, path, endpoint) of the FastAPI app's routes, routers expanded."""
    routes = []
    for route in app.routes:
        context = getattr(route, "include_context", None)
        if context is not None:
            for inner in route.original_router.routes:
                for method in getattr(inner, "methods", None) or ():
                    routes.append((method, context.prefix + inner.path, inner.name))
        else:
            for method in getattr(route, "methods", None) or ():
                routes.append((method, route.path, route.name))
    return routes


def route_table() -> list[dict]:
    """Return every method and path that the installed MLflow server routes.

    Each entry has method, path (without static prefix), endpoint, source
    (flask or fastapi) and prefixable (whether --static-prefix moves it).
    Imports mlflow.server with a marker static prefix, so call it in a process
    that has not imported mlflow.server yet.
    """
    if "mlflow.server" in sys.modules:
        raise RuntimeError("route_table() needs a process that has not imported mlflow.server yet")
    os.environ["_MLFLOW_STATIC_PREFIX"] = PREFIX_MARKER
    import mlflow.server
    from mlflow.server.fastapi_app import create_fastapi_app

    raw = [
        (method, rule.rule, rule.endpoint, "flask")
        for rule in mlflow.server.app.url_map.iter_rules()
        for method in rule.methods
    ]
    flask_keys = {(method, path) for method, path, _, _ in raw}
    for method, path, endpoint in _fastapi_routes(create_fastapi_app(mlflow.server.app)):
        # The FastAPI app forwards everything it does not route to Flask
        # through a mount, which carries no methods and is skipped above.
        if (method, path) not in flask_keys:
            raw.append((method, path, endpoint, "fastapi"))

    table = []
    for method, path, endpoint, source in raw:
        if method in IGNORED_METHODS:
            continue
        prefixable = path.startswith(PREFIX_MARKER)
        if prefixable:
            path = path[len(PREFIX_MARKER):] or "/"
        table.append({
            "method": method, "path": path, "endpoint": endpoint,
            "source": source, "prefixable": prefixable,
        })
    table.sort(key=lambda entry: (entry["path"], entry["method"]))
    return table


def is_read(entry: dict) -> bool:
    """Return whether the guard passes this route."""
    if entry["path"].startswith(EXCLUDED_PREFIXES):
        return False
    if entry["method"] in READ_METHODS:
        return True
    return entry["method"] == "POST" and entry["source"] == "flask" and entry["endpoint"] in READ_ONLY_POST_ENDPOINTS


def allowlist(table: list[dict]) -> dict:
    """Return the data file's content for `table`."""
    import mlflow

    reads = [
        {
            "method": entry["method"],
            "path": entry["path"],
            "regex": path_regex(entry["path"]),
            "prefixable": entry["prefixable"],
        }
        for entry in table if is_read(entry)
    ]
    rejected = [f"{entry['method']} {entry['path']}" for entry in table if not is_read(entry)]
    return {"mlflow_version": mlflow.__version__, "reads": reads, "rejected": rejected}


def render(data: dict) -> str:
    header = (
        "# Routes that the read-only guard passes, derived from MLflow's route table by\n"
        "# scripts/guard_routes.py. Do not edit by hand: rerun the script after an\n"
        "# MLflow upgrade and review the diff. `rejected` lists, for review only, the\n"
        "# routes that the guard answers with 403.\n"
    )
    return header + yaml.dump(data, Dumper=_IndentedDumper, sort_keys=False, width=200)


class _IndentedDumper(yaml.SafeDumper):
    """A SafeDumper that indents list items below their key, as yamllint expects."""

    def increase_indent(self, flow: bool = False, indentless: bool = False):
        return super().increase_indent(flow, False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when the data file is out of date")
    parser.add_argument("--output", type=Path, default=DATA_FILE, help=f"data file (default {DATA_FILE})")
    arguments = parser.parse_args(argv)

    text = render(allowlist(route_table()))
    if arguments.check:
        current = arguments.output.read_text() if arguments.output.exists() else ""
        if current != text:
            print(f"{arguments.output} is out of date for the installed MLflow: run {sys.argv[0]} and review the diff",
                  file=sys.stderr)
            return 1
        return 0
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
