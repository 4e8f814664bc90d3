"""Command line of mlflow-replay: apply, teardown and validate."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from mlflow_replay.config import ConfigError
from mlflow_replay.playbook_run import PROJECT_ROOT, PlaybookRun
from mlflow_replay.progress import Progress, recap_lines
from mlflow_replay.vars_file import validate_vars_file

EXIT_OK = 0
EXIT_HOST_FAILED = 1
EXIT_INVALID_CONFIG = 2
EXIT_UNREACHABLE = 4
CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

EPILOG = """exit codes:
  0  success
  1  a task failed on a host
  2  invalid configuration (nothing was changed)
  4  a host was unreachable
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="runner.py",
        description="Provision read-only MLflow viewers of published experiment stores.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--inventory", "-i", type=Path, default=PROJECT_ROOT / "inventory" / "local.yml",
                        help="Ansible inventory of the nodes (default: the local node)")
    common.add_argument("--vars", type=Path, default=PROJECT_ROOT / "vars" / "replay.yml",
                        help="vars file describing the replay (default: vars/replay.yml)")
    common.add_argument("--limit", "-l", help="run only on these hosts (Ansible host pattern)")
    common.add_argument("--verbose", "-v", action="count", default=0,
                        help="pass -v to ansible-playbook; repeat for more detail")
    changes = argparse.ArgumentParser(add_help=False)
    changes.add_argument("--check", action="store_true", help="report what would change, change nothing")
    changes.add_argument("--diff", action="store_true", help="show changes to files (secrets are hidden)")

    commands.add_parser("apply", parents=[common, changes], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="make every node serve the replay; repairs drift when rerun")
    teardown = commands.add_parser("teardown", parents=[common, changes], epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   help="remove everything apply created on the nodes")
    teardown.add_argument("--replay", action="append", default=[], metavar="NAME",
                          help="remove only this replay (repeatable); default: every replay on the nodes")
    commands.add_parser("validate", parents=[common], epilog=EPILOG,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        help="check the vars file offline, without contacting any node")
    return parser


def check_configuration(args) -> list[dict]:
    """Validate the vars file and the credentials; raise ConfigError if invalid."""
    if not args.inventory.is_file():
        raise ConfigError("--inventory", str(args.inventory), "is not a file",
                          "Pass an inventory file, for example inventory/local.yml.")
    replays = validate_vars_file(args.vars)
    if any(not replay["anonymous"] for replay in replays):
        for variable in CREDENTIAL_VARIABLES:
            if not os.environ.get(variable):
                raise ConfigError(variable, None, "is not set",
                                  f"Export {variable} (your EC2 credentials), or set anonymous: true for a public store.")
    return replays


def exit_code(result, failures: list[dict]) -> int:
    if result.stats.get("dark"):
        return EXIT_UNREACHABLE
    if result.rc != 0 or result.stats.get("failures") or failures:
        return EXIT_HOST_FAILED
    return EXIT_OK


def print_summary(result, progress: Progress, elapsed: float) -> None:
    failures = progress.failures
    if result.rc != 0 and not result.stats:
        # ansible-playbook stopped before it ran a play: show why.
        print("\nansible-playbook stopped before running any task:")
        print("\n".join(progress.messages[-40:]) or f"  exit status {result.rc}, no message")
    else:
        print("\nPLAY RECAP")
        for line in recap_lines(result.stats):
            print(line)
    for failure in failures:
        print(f"\nFAILED on {failure['host']}, task '{failure['task']}':\n  {failure['message']}")
    replays = result.custom_stats.get("replays", {})
    for host, reports in sorted(replays.items()):
        for report in reports:
            print(f"\n{host}: {report['summary']}")
            for url in report["urls"]:
                print(f"  open {url}")
    print(f"\nfinished in {elapsed:.0f} s")


def run_playbook(playbook: str, args) -> int:
    run = PlaybookRun(
        playbook,
        inventory=args.inventory.resolve(),
        vars_file=args.vars.resolve(),
        limit=args.limit,
        check=getattr(args, "check", False),
        diff=getattr(args, "diff", False),
        verbosity=args.verbose,
        extra_vars={"mlflow_replay_only": args.replay} if getattr(args, "replay", None) else None,
    )
    started = time.monotonic()
    with Progress() as progress:
        result = run.run(progress.handle)
    print_summary(result, progress, time.monotonic() - started)
    return exit_code(result, progress.failures)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command != "teardown":
            replays = check_configuration(args)
    except ConfigError as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        return EXIT_INVALID_CONFIG
    if args.command == "validate":
        names = ", ".join(replay["name"] for replay in replays)
        print(f"{args.vars}: valid ({len(replays)} replay: {names})")
        return EXIT_OK
    try:
        return run_playbook(f"{args.command}.yml", args)
    except KeyboardInterrupt:
        print("\ninterrupted: the nodes may be half-applied; rerun apply or teardown", file=sys.stderr)
        return 130
