"""Ansible filter of the replay_status role: one health report per replay.

The logic lives in `mlflow_replay.status` at the repository root, so runner.py
and its tests share it. Ansible loads this file by path, hence the sys.path
entry below.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlflow_replay.status import replay_status  # noqa: E402


def mlflow_replay_status(replays, mounts, snapshots, sources, health, experiments, address, facts):
    """Return the health report of each replay; see mlflow_replay.status.replay_status."""
    return replay_status(list(replays), list(mounts), list(snapshots), list(sources), list(health),
                         list(experiments), address, dict(facts or {}))


class FilterModule:
    def filters(self):
        return {"mlflow_replay_status": mlflow_replay_status}
