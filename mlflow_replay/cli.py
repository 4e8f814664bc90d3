"""Command line of mlflow-replay: apply, teardown, status and validate."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mlflow_replay.config import ConfigError
from mlflow_replay.lock import InventoryLock, LockHeldError, command_line
from mlflow_replay.playbook_run import PROJECT_ROOT, PlaybookRun
from mlflow_replay.progress import Progress
from mlflow_replay.run_log import RunLog
from mlflow_replay.secrets import load_secrets, missing_credentials, secret_values, vault_password_file
from mlflow_replay.summary import build_document, print_text
from mlflow_replay.vars_file import check_inventory, validate_vars_file

EXIT_OK = 0
EXIT_HOST_FAILED = 1
EXIT_INVALID_CONFIG = 2
EXIT_UNHEALTHY = 3
EXIT_UNREACHABLE = 4
EXIT_LOCKED = 5
# 128 + SIGINT, as shells report a command that Ctrl-C stopped.
EXIT_INTERRUPTED = 130

EPILOG = """exit codes:
  0  success
  1  a task failed on a host
  2  invalid configuration (nothing was changed)
  3  status: a replay is unhealthy (its problems are listed)
  4  a host was unreachable (the reachable hosts still ran)
  5  another apply or teardown against the same inventory is running; nothing was changed
  130  interrupted (SIGINT or SIGTERM): hosts may be half-applied; run apply or teardown again

Same job without runner.py, from the repository root:
  ansible-playbook -i INVENTORY playbooks/COMMAND.yml -e @VARS [-e @SECRETS]
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
                        help="Ansible inventory of the nodes, group replay_nodes (default: inventory/local.yml, "
                             "the local node)")
    common.add_argument("--vars", type=Path, default=PROJECT_ROOT / "vars" / "replay.yml",
                        help="vars file describing the replay (default: vars/replay.yml)")
    common.add_argument("--json", action="store_true",
                        help="print one JSON summary document instead of progress and recap")
    playbook = argparse.ArgumentParser(add_help=False)
    playbook.add_argument("--limit", "-l", help="run only on these hosts (Ansible host pattern)")
    playbook.add_argument("--check", action="store_true", help="report what would change, change nothing")
    playbook.add_argument("--diff", action="store_true", help="show changes to files (secrets are hidden)")
    playbook.add_argument("--verbose", "-v", action="count", default=0,
                          help="pass -v to ansible-playbook; repeat for more detail")
    secrets = argparse.ArgumentParser(add_help=False)
    secrets.add_argument("--secrets", type=Path,
                          help="extra vars file, usually ansible-vault encrypted, that may set "
                               "mlflow_replay_access_key_id and mlflow_replay_secret_access_key "
                               "(default: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY from the environment)")
    secrets.add_argument("--vault-password-file", type=Path,
                          help="file (or script) holding the vault password of --secrets "
                               "(default: $ANSIBLE_VAULT_PASSWORD_FILE)")

    only = argparse.ArgumentParser(add_help=False)
    only.add_argument("--replay", action="append", default=[], metavar="NAME",
                      help="remove only this replay (repeatable); default: every replay on the nodes")

    def add(name: str, parents: list, help_text: str) -> None:
        commands.add_parser(name, parents=parents, epilog=EPILOG, help=help_text, description=help_text,
                            formatter_class=argparse.RawDescriptionHelpFormatter)

    add("apply", [common, playbook, secrets], "make every node serve the replay; repairs drift when rerun")
    add("teardown", [common, playbook, secrets, only], "remove everything apply created on the nodes")
    add("status", [common, playbook, secrets],
        "report mounts, snapshot age and size, store changes since the import, server health and URL "
        "of each replay; changes nothing")
    add("validate", [common, secrets], "check the vars file offline, without contacting any node")
    return parser


def check_configuration(args) -> tuple[list[dict], dict]:
    """Validate the inventory, vars file, secrets and credentials; raise ConfigError if invalid.

    Returns the replays and the variables of the secrets file.
    """
    if not args.inventory.is_file():
        raise ConfigError("--inventory", str(args.inventory), "is not a file",
                          "Pass an inventory file, for example inventory/local.yml.")
    check_inventory(args.inventory)
    # teardown works from what is installed on the nodes, so an invalid or
    # missing vars file must not block it.
    replays = [] if args.command == "teardown" else validate_vars_file(args.vars)
    secrets = {}
    if getattr(args, "secrets", None) is not None:
        secrets = load_secrets(args.secrets, vault_password_file(args.vault_password_file))
    # status and teardown use the credentials stored on the nodes.
    if args.command in ("apply", "validate") and any(not replay["anonymous"] for replay in replays):
        for variable in missing_credentials(secrets):
            raise ConfigError(variable, None, "is not set",
                              f"Export {variable} (your EC2 credentials), pass --secrets FILE that sets the "
                              "mlflow_replay_* credential variables, or set anonymous: true for a public store.")
    return replays, secrets


def exit_code(command: str, result, failures: list[dict]) -> int:
    if result.interrupted:
        return EXIT_INTERRUPTED
    if result.stats.get("dark"):
        return EXIT_UNREACHABLE
    if result.rc != 0 or result.stats.get("failures") or failures:
        return EXIT_HOST_FAILED
    if command == "status":
        reports = [r for host_reports in (result.custom_stats.get("status") or {}).values() for r in host_reports]
        if any(not report.get("healthy") for report in reports):
            return EXIT_UNHEALTHY
    return EXIT_OK


def run_playbook(args, secrets: dict, lock: InventoryLock | None = None) -> int:
    command = args.command
    run = PlaybookRun(
        f"{command}.yml",
        inventory=args.inventory.resolve(),
        vars_file=args.vars.resolve() if args.vars.is_file() else None,
        limit=args.limit,
        check=args.check,
        diff=args.diff,
        verbosity=args.verbose,
        secrets_file=args.secrets.resolve() if args.secrets else None,
        vault_password_file=args.vault_password_file.resolve() if args.vault_password_file else None,
        extra_vars={"mlflow_replay_only": args.replay} if getattr(args, "replay", None) else None,
    )
    log = RunLog(command, secret_values(secrets))
    started = time.monotonic()
    try:
        with Progress(stream=None if args.json else sys.stdout, log=log,
                      show_diff=getattr(args, "diff", False)) as progress:
            result = run.run(progress.handle, on_start=lock.record_child if lock else None)
        elapsed = time.monotonic() - started
        code = exit_code(command, result, progress.failures)
        document = build_document(command, result, progress.failures, elapsed, code, log.path)
        if result.interrupted:
            document["interrupted"] = {"hosts": sorted(progress.hosts_started)}
        log.write(json.dumps(document, indent=2))
        if args.json:
            print(json.dumps(document, indent=2))
        elif result.stats or not result.interrupted:
            # An interrupted ansible-playbook prints no recap, so there is none to show.
            print_text(command, result, progress, elapsed, log.path)
        if result.interrupted:
            message = interruption_message(command, sorted(progress.hosts_started))
            log.write(message)
            print(message, file=sys.stderr)
        return code
    finally:
        log.close()


def interruption_message(command: str, hosts: list[str]) -> str:
    """Return the message of an interrupted run: the hosts that may be half-done and what to run next."""
    if not hosts:
        return f"\ninterrupted: {command} stopped before any task started on a host; nothing was changed."
    verb = "half-applied" if command == "apply" else "half-removed"
    return (
        f"\ninterrupted: {command} stopped part way. These hosts may be {verb}: {', '.join(hosts)}.\n"
        "Run 'runner.py apply' again to finish the replay, or 'runner.py teardown' to remove it; "
        "both work from this state."
    )


def run_locked(args, secrets: dict) -> int:
    """Run the playbook of apply or teardown while holding the inventory's lock.

    --check changes nothing on the nodes, so it runs without the lock, as status does.
    """
    if args.command not in ("apply", "teardown") or args.check:
        return run_playbook(args, secrets)
    try:
        with InventoryLock(args.inventory, command_line()) as lock:
            return run_playbook(args, secrets, lock)
    except LockHeldError as error:
        print(f"{args.command} rejected: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"command": args.command, "exit_code": EXIT_LOCKED, "error": str(error),
                              "holder": error.holder}))
        return EXIT_LOCKED


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        replays, secrets = check_configuration(args)
    except ConfigError as error:
        print(f"invalid configuration: {error}", file=sys.stderr)
        if args.json:
            print(json.dumps({"command": args.command, "exit_code": EXIT_INVALID_CONFIG, "error": str(error)}))
        return EXIT_INVALID_CONFIG
    if args.command == "validate":
        names = ", ".join(replay["name"] for replay in replays)
        if args.json:
            print(json.dumps({"command": "validate", "exit_code": EXIT_OK, "replays": [r["name"] for r in replays]}))
        else:
            print(f"{args.vars}: valid ({len(replays)} replay: {names})")
        return EXIT_OK
    try:
        return run_locked(args, secrets)
    except KeyboardInterrupt:
        # Only a signal outside the playbook run lands here: PlaybookRun
        # handles SIGINT itself while ansible-playbook runs.
        print(f"\ninterrupted: {args.command} stopped outside the playbook run; hosts may be half-applied. "
              "Run apply or teardown again.", file=sys.stderr)
        return EXIT_INTERRUPTED
