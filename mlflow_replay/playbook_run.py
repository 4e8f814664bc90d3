"""One ansible-playbook run through ansible-runner, with no secret left on disk."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ansible_runner
import yaml

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def search_path() -> str:
    """Return PATH with this Python's bin directory first.

    ansible-runner finds ansible-playbook on PATH only, which misses a
    virtualenv that was not activated (`.venv/bin/python runner.py ...`).
    Its `binary` option is no way out: it switches to running a raw command
    without the playbook.
    """
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)])


@dataclass
class RunResult:
    """Result of a finished run: Ansible's per-host counters and stats data."""

    status: str
    rc: int
    stats: dict = field(default_factory=dict)
    custom_stats: dict = field(default_factory=dict)


class PlaybookRun:
    """Run one playbook of this project against an inventory.

    Contract:
    - The child ansible-playbook inherits this process's environment, so
      credentials exported as AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY reach
      the roles' env lookups and never appear on a command line.
    - ansible-runner writes the whole environment into its artifacts
      (`artifacts/<id>/command`) and reuses `env/extravars` left by earlier
      runs. Each run therefore gets a fresh private data directory at mode
      0700, removed when the run ends, whatever the outcome.
    - `on_event` receives every Ansible event as ansible-runner delivers it.
    """

    def __init__(self, playbook: str, inventory: Path, vars_file: Path | None = None,
                 limit: str | None = None, check: bool = False, diff: bool = False, verbosity: int = 0,
                 secrets_file: Path | None = None, vault_password_file: Path | None = None,
                 extra_vars: dict | None = None):
        self.playbook = PROJECT_ROOT / "playbooks" / playbook
        self.inventory = inventory
        self.vars_file = vars_file
        # Extra vars file with credentials, usually ansible-vault encrypted.
        # Only its path reaches the command line.
        self.secrets_file = secrets_file
        self.vault_password_file = vault_password_file
        self.limit = limit
        self.check = check
        self.diff = diff
        self.verbosity = verbosity
        # Non-secret settings only: they appear on ansible-playbook's command line.
        self.extra_vars = extra_vars or {}

    def inventories(self, private_dir: Path) -> list[str]:
        """Return the inventory sources: the user's, then the vars file as group vars.

        Passed with --extra-vars, the vars file would override every host
        variable (extra vars rank highest in Ansible). As the vars of the
        `all` group in an inventory source of their own, they rank below
        host_vars, so a node can override a setting, such as its port.
        """
        sources = [str(self.inventory)]
        if self.vars_file is not None:
            settings = yaml.safe_load(self.vars_file.read_text(encoding="utf-8")) or {}
            group_vars = private_dir / "replay-vars.yml"
            group_vars.write_text(yaml.safe_dump({"all": {"vars": settings}}), encoding="utf-8")
            sources.append(str(group_vars))
        return sources

    def command_line(self) -> str:
        """Return the ansible-playbook options other than playbook and inventory."""
        options = []
        if self.extra_vars:
            options += ["--extra-vars", json.dumps(self.extra_vars)]
        if self.secrets_file is not None:
            options += ["--extra-vars", f"@{self.secrets_file}"]
        if self.vault_password_file is not None:
            options += ["--vault-password-file", str(self.vault_password_file)]
        if self.limit:
            options += ["--limit", self.limit]
        if self.check:
            options.append("--check")
        if self.diff:
            options.append("--diff")
        return shlex.join(options)

    def run(self, on_event: Callable[[dict], None]) -> RunResult:
        private_dir = Path(tempfile.mkdtemp(prefix="mlflow-replay-run-"))
        os.chmod(private_dir, 0o700)
        try:
            runner = ansible_runner.run(
                private_data_dir=str(private_dir),
                project_dir=str(PROJECT_ROOT),
                playbook=str(self.playbook),
                inventory=self.inventories(private_dir),
                cmdline=self.command_line(),
                envvars={
                    "ANSIBLE_CONFIG": str(PROJECT_ROOT / "ansible.cfg"),
                    "ANSIBLE_NOCOLOR": "1",
                    "PATH": search_path(),
                },
                verbosity=self.verbosity or None,
                quiet=True,
                event_handler=lambda event: on_event(event) or True,
                rotate_artifacts=1,
            )
            stats_event = next(
                (e for e in reversed(list(runner.events)) if e.get("event") == "playbook_on_stats"), {}
            )
            data = stats_event.get("event_data", {})
            return RunResult(
                status=runner.status,
                rc=runner.rc,
                stats=runner.stats or {},
                custom_stats=data.get("artifact_data", {}) or {},
            )
        finally:
            shutil.rmtree(private_dir, ignore_errors=True)
