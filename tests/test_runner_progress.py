"""Live progress, failure messages and the run log, from real ansible-playbook events.

Each test runs a small playbook against the control host (local connection)
through ansible-runner, as runner.py does, and feeds the events to Progress.
"""

from __future__ import annotations

import io
import stat
import sys
import tempfile
from pathlib import Path

import ansible_runner

from mlflow_replay.playbook_run import search_path
from mlflow_replay.progress import Progress
from mlflow_replay.run_log import MASK, RunLog

SECRET = "mlr-canary-progress-test"

PLAYBOOK = f"""
- name: Progress cases
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write secret files in a loop
      ansible.builtin.command: echo {SECRET}
      loop: [one, two]
      no_log: true
      changed_when: item == 'two'
    - name: Read without change in a loop
      ansible.builtin.command: "true"
      loop: [one]
      no_log: true
      changed_when: false
    - name: Fail one item of a loop
      ansible.builtin.command: "{{{{ 'false' if item == 'bad' else 'true' }}}}"
      loop: [good, bad]
      loop_control:
        label: "item-{{{{ item }}}}"
      ignore_errors: true
    - name: Fail a secret task
      ansible.builtin.command: "sh -c 'echo {SECRET} >&2; exit 3'"
      no_log: true
"""


def run_playbook(tmp_path: Path, progress: Progress) -> None:
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(PLAYBOOK)
    private_dir = Path(tempfile.mkdtemp(dir=tmp_path))
    ansible_runner.run(
        private_data_dir=str(private_dir),
        playbook=str(playbook),
        inventory=f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}",
        envvars={"ANSIBLE_NOCOLOR": "1", "PATH": search_path()},
        quiet=True,
        event_handler=lambda event: progress.handle(event) or True,
    )


def test_progress_cases(tmp_path):
    output = io.StringIO()
    log = RunLog("test", [SECRET], directory=tmp_path / "logs")
    with Progress(stream=output, log=log) as progress:
        run_playbook(tmp_path, progress)
    log.close()
    lines = output.getvalue()
    log_text = log.path.read_text()

    assert "TASK Write each replay" not in lines
    assert "TASK Write secret files in a loop\n  localhost: changed\n" in lines
    assert "TASK Read without change in a loop\n  localhost: ok\n" in lines
    assert "TASK Fail one item of a loop\n  localhost: failed (ignored)\n" in lines
    assert "TASK Fail a secret task\n  localhost: FAILED\n" in lines
    assert "\x1b" not in lines
    assert SECRET not in lines
    (failure,) = progress.failures
    assert failure["host"] == "localhost"
    assert failure["task"] == "Fail a secret task"
    assert "no_log" in failure["message"]
    assert SECRET not in failure["message"]
    assert SECRET not in log_text
    assert "Fail a secret task" in log_text
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600


def test_loop_failure_names_item(tmp_path):
    playbook_tasks = PLAYBOOK.replace("      ignore_errors: true\n", "")
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(playbook_tasks)
    progress = Progress(stream=io.StringIO())
    ansible_runner.run(
        private_data_dir=tempfile.mkdtemp(dir=tmp_path),
        playbook=str(playbook),
        inventory=f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}",
        envvars={"ANSIBLE_NOCOLOR": "1", "PATH": search_path()},
        quiet=True,
        event_handler=lambda event: progress.handle(event) or True,
    )

    (failure,) = progress.failures
    assert failure["task"] == "Fail one item of a loop"
    assert failure["message"].startswith("item item-bad: ")
    assert "non-zero return code" in failure["message"]


def test_run_log_rotates_and_scrubs(tmp_path):
    directory = tmp_path / "logs"
    paths = []
    for number in range(4):
        log = RunLog(f"apply{number}", ["s3cr3t", "s3cr3t-longer"], directory=directory, keep=3)
        log.write("key s3cr3t-longer and s3cr3t\n")
        log.close()
        paths.append(log.path)

    assert sorted(directory.iterdir()) == sorted(paths[1:])
    assert paths[-1].read_text() == f"key {MASK} and {MASK}\n"
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700


DIFF_PLAYBOOK = f"""
- name: Diff cases
  hosts: localhost
  gather_facts: false
  tasks:
    - name: Write a config file
      ansible.builtin.copy:
        content: "endpoint = new\\nsecret = {SECRET}\\n"
        dest: "{{{{ target }}}}"
        mode: "0600"
    - name: Show a message per item
      ansible.builtin.debug:
        msg: "message for {{{{ item }}}}"
      loop: [first]
"""


def run_diff_playbook(tmp_path: Path, progress: Progress, diff: bool) -> None:
    """Run DIFF_PLAYBOOK on a config file that its first task changes."""
    target = tmp_path / "app.conf"
    target.write_text("endpoint = old\n")
    playbook = tmp_path / "playbook.yml"
    playbook.write_text(DIFF_PLAYBOOK)
    ansible_runner.run(
        private_data_dir=tempfile.mkdtemp(dir=tmp_path),
        playbook=str(playbook),
        inventory=f"localhost ansible_connection=local ansible_python_interpreter={sys.executable}",
        envvars={"ANSIBLE_NOCOLOR": "1", "PATH": search_path()},
        cmdline=("--diff " if diff else "") + f"--extra-vars target={target}",
        quiet=True,
        event_handler=lambda event: progress.handle(event) or True,
    )


def test_diff_prints_file_diff_and_debug_scrubbed(tmp_path):
    output = io.StringIO()
    log = RunLog("test", [SECRET], directory=tmp_path / "logs")
    with Progress(stream=output, log=log, show_diff=True) as progress:
        run_diff_playbook(tmp_path, progress, diff=True)
    log.close()
    lines = output.getvalue()

    assert "    -endpoint = old" in lines
    assert "    +endpoint = new" in lines
    assert f"+secret = {MASK}" in lines
    assert SECRET not in lines
    assert "message for first" in lines


def test_no_diff_prints_task_lines_only(tmp_path):
    output = io.StringIO()
    with Progress(stream=output) as progress:
        run_diff_playbook(tmp_path, progress, diff=False)

    assert "endpoint" not in output.getvalue()
    assert "message for first" not in output.getvalue()
