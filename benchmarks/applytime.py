"""Apply time on one node and on three nodes, measured side by side.

Both inventories serve the same single replay of the smallest store, so the
numbers show the cost of Ansible and the roles, not of the import.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from tests import conftest

from benchmarks.environment import BenchEnvironment, PublishedStore, replay_entry


@dataclass
class ApplyTimes:
    """Wall-clock seconds, changed tasks and CPU seconds of runner.py apply, by case and node count."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    changed: dict[tuple[str, int], list[int]] = field(default_factory=dict)
    controller_cpu: dict[tuple[str, int], list[float]] = field(default_factory=dict)
    node_cpu: dict[tuple[str, int], list[float]] = field(default_factory=dict)

    def add(self, case: str, nodes: int, result) -> None:
        self.seconds.setdefault((case, nodes), []).append(result.seconds)
        self.changed.setdefault((case, nodes), []).append(result.changed())
        self.controller_cpu.setdefault((case, nodes), []).append(result.controller_cpu)
        self.node_cpu.setdefault((case, nodes), []).append(result.node_cpu)

    def median(self, case: str, nodes: int) -> float:
        return statistics.median(self.seconds[(case, nodes)])


def measure_apply(environment: BenchEnvironment, store: PublishedStore, one_node: list,
                  three_nodes: list, repetitions: int) -> ApplyTimes:
    """Time cold apply, idempotent re-apply and re-apply after a vars change on both inventories."""
    times = ApplyTimes()
    setups = {}
    for count, nodes in ((1, one_node), (3, three_nodes)):
        setups[count] = environment.write_replay_files(f"apply-{count}", nodes, [replay_entry(store, 8000)],
                                                       workers=1)
    # The same inventories with replay_record off: every role runs each time.
    every_role = {count: (vars_file, _without_record(inventory)) for count, (vars_file, inventory) in setups.items()}
    for count in (1, 3):
        times.add("cold apply", count, environment.runner("apply", *setups[count]))
    for _ in range(repetitions):
        for count in (1, 3):
            times.add("idempotent re-apply", count, environment.runner("apply", *setups[count]))
    for _ in range(repetitions):
        for count in (1, 3):
            times.add("idempotent re-apply, every role (record off)", count,
                      environment.runner("apply", *every_role[count]))
    # One vars change that reaches the nodes: the worker count rewrites the
    # server unit and restarts the server. It alternates 2, 1, 2, ...
    for repetition in range(max(2, repetitions // 2)):
        workers = 2 if repetition % 2 == 0 else 1
        for count, nodes in ((1, one_node), (3, three_nodes)):
            files = environment.write_replay_files(f"apply-{count}", nodes, [replay_entry(store, 8000)],
                                                   workers=workers)
            times.add("re-apply after a vars change", count, environment.runner("apply", *files))
    # Pipelining is on in ansible.cfg, and these runs measure what it saves
    # when every role runs.
    for _ in range(2):
        for count in (1, 3):
            times.add("idempotent re-apply, every role, pipelining off", count,
                      environment.runner("apply", *every_role[count], extra_env={"ANSIBLE_PIPELINING": "False"}))
    return times


def _without_record(inventory: Path) -> Path:
    """Write a copy of `inventory` that turns replay_record off for its nodes, and return its path."""
    copy = inventory.with_name(inventory.stem + "-every-role.ini")
    copy.write_text(inventory.read_text() + "\n[replay_nodes:vars]\nreplay_record_enabled=false\n")
    return copy


def profile_idempotent_apply(environment: BenchEnvironment, vars_file: Path, inventory: Path,
                             top: int = 15) -> list[str]:
    """Run the apply playbook once with ansible.posix.profile_tasks and return its slowest task lines."""
    completed = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory), "playbooks/apply.yml",
         "-e", f"@{vars_file}"],
        cwd=conftest.PROJECT_ROOT, capture_output=True, text=True, timeout=1800, check=False,
        env=environment.credentials_environment({
            "ANSIBLE_CALLBACKS_ENABLED": "ansible.posix.profile_tasks",
            "PROFILE_TASKS_TASK_OUTPUT_LIMIT": str(top),
        }),
    )
    if completed.returncode != 0:
        raise RuntimeError(f"ansible-playbook failed with exit code {completed.returncode}:\n"
                           f"{completed.stdout[-3000:]}")
    lines = completed.stdout.splitlines()
    recap = [index for index, line in enumerate(lines) if line.startswith("PLAY RECAP")][-1]
    return [line for line in lines[recap:] if line.rstrip().endswith("s") and "----" in line]
