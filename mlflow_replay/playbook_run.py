"""One ansible-playbook run through ansible-runner, with no secret left on disk."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import ansible_runner
import yaml

from mlflow_replay import inputs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# After the first SIGINT, ansible-playbook gets this long to stop on its own
# before its whole process group is killed.
INTERRUPT_GRACE_SECONDS = 15


def search_path(first: Path | None = None) -> str:
    """Return PATH with `first`, then this Python's bin directory, in front.

    ansible-runner finds ansible-playbook on PATH only, which misses a
    virtualenv that was not activated (`.venv/bin/python runner.py ...`).
    Its `binary` option is no way out: it switches to running a raw command
    without the playbook.
    """
    directories = [str(first)] if first is not None else []
    directories += [str(Path(sys.executable).parent), os.environ.get("PATH", os.defpath)]
    return os.pathsep.join(directories)


# Started by ansible-runner in place of ansible-playbook, through PATH. It
# runs the real ansible-playbook as its child and stops it when runner.py
# dies, even from SIGKILL. Without it, ansible-playbook outlives runner.py,
# because ansible-runner starts it with SIGHUP ignored, and it can hang once
# no process reads its terminal (seen with ansible-core 2.19).
CHILD_GUARD = """#!{python}
import ctypes, os, shutil, signal, sys

PR_SET_PDEATHSIG = 1
GRACE_SECONDS = {grace}


def stop_group(number, frame):
    # The same SIGINT that a Ctrl-C in ansible-playbook sends, then SIGKILL.
    signal.signal(signal.SIGALRM, lambda *_: os.killpg(0, signal.SIGKILL))
    signal.alarm(GRACE_SECONDS)
    os.killpg(0, signal.SIGINT)


signal.signal(signal.SIGINT, signal.SIG_IGN)
signal.signal(signal.SIGUSR1, stop_group)
ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGUSR1)
child = os.fork()
if child == 0:
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    os.execv({playbook!r}, [{playbook!r}, *sys.argv[1:]])
if os.getppid() != {parent}:
    stop_group(None, None)
status = os.waitpid(child, 0)[1]
if os.getppid() != {parent}:
    # runner.py died and cannot remove its private directory, which
    # contains the environment with the credentials, so remove it here.
    shutil.rmtree({private_dir!r}, ignore_errors=True)
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


def write_child_guard(directory: Path) -> Path:
    """Write CHILD_GUARD as `ansible-playbook` into `directory` and return the directory."""
    directory.mkdir(mode=0o700)
    guard = directory / "ansible-playbook"
    guard.write_text(CHILD_GUARD.format(python=sys.executable, grace=INTERRUPT_GRACE_SECONDS,
                                        playbook=str(Path(sys.executable).parent / "ansible-playbook"),
                                        parent=os.getpid(), private_dir=str(directory.parent)))
    guard.chmod(0o700)
    return directory


@dataclass
class RunResult:
    """Result of a finished run: Ansible's per-host counters and stats data."""

    status: str
    rc: int
    stats: dict = field(default_factory=dict)
    custom_stats: dict = field(default_factory=dict)
    # True when SIGINT or SIGTERM stopped the run before ansible-playbook finished.
    interrupted: bool = False


class Interruption:
    """SIGINT and SIGTERM handling while ansible-playbook runs.

    The first signal forwards SIGINT to ansible-playbook's process group (it
    runs in a session of its own, so a terminal's Ctrl-C does not reach it),
    which stops Ansible the way Ctrl-C in ansible-playbook does. `cancel`
    turns true on a second signal, or INTERRUPT_GRACE_SECONDS after the first;
    ansible-runner then kills the process group with SIGKILL.
    """

    def __init__(self):
        self.child_pid: int | None = None
        self.first_signal: float | None = None
        self.count = 0
        self._previous = {}

    def install(self) -> None:
        for number in (signal.SIGINT, signal.SIGTERM):
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def observe(self, event: dict) -> bool:
        """Record ansible-playbook's PID from its first event; return True when newly recorded."""
        pid = event.get("pid")
        if self.child_pid is None and isinstance(pid, int) and pid != os.getpid():
            self.child_pid = pid
            return True
        return False

    def _handle(self, number, frame) -> None:
        self.count += 1
        if self.first_signal is None:
            self.first_signal = time.monotonic()
            if self.child_pid is not None:
                try:
                    os.killpg(os.getpgid(self.child_pid), signal.SIGINT)
                except (ProcessLookupError, PermissionError):
                    pass

    def cancel(self) -> bool:
        if self.first_signal is None:
            return False
        waited = time.monotonic() - self.first_signal
        return self.count > 1 or self.child_pid is None or waited > INTERRUPT_GRACE_SECONDS


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
    - SIGINT or SIGTERM stops ansible-playbook (see Interruption) and the run
      returns a result with `interrupted` set; it raises no KeyboardInterrupt.
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

    def run(self, on_event: Callable[[dict], None], on_start: Callable[[int], None] | None = None) -> RunResult:
        """Run the playbook; `on_start` receives ansible-playbook's PID once its first event arrives."""
        private_dir = Path(tempfile.mkdtemp(prefix="mlflow-replay-run-"))
        os.chmod(private_dir, 0o700)
        interruption = Interruption()
        interruption.install()

        def handle(event: dict) -> bool:
            if interruption.observe(event) and on_start is not None:
                on_start(interruption.child_pid)
            on_event(event)
            return True

        try:
            inventories = self.inventories(private_dir)
            sources = inventories + ([str(self.secrets_file)] if self.secrets_file is not None else [])
            runner = ansible_runner.run(
                private_data_dir=str(private_dir),
                project_dir=str(PROJECT_ROOT),
                playbook=str(self.playbook),
                inventory=inventories,
                cmdline=self.command_line(),
                envvars={
                    inputs.ENVIRONMENT_NAME: inputs.inputs_digest(PROJECT_ROOT, sources, json.dumps(self.extra_vars, sort_keys=True)),
                    "ANSIBLE_CONFIG": str(PROJECT_ROOT / "ansible.cfg"),
                    "ANSIBLE_NOCOLOR": "1",
                    "PATH": search_path(write_child_guard(private_dir / "bin")),
                },
                verbosity=self.verbosity or None,
                quiet=True,
                event_handler=handle,
                cancel_callback=interruption.cancel,
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
                interrupted=interruption.first_signal is not None,
            )
        finally:
            interruption.restore()
            shutil.rmtree(private_dir, ignore_errors=True)
