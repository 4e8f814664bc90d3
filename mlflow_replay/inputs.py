"""Digest of everything that decides what apply puts on a node.

The replay_record role stores it on each node after a complete apply. A later
apply with the same digest may stop early on a node that is still as
recorded. Any change to the inputs below makes every role run again.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from mlflow_replay.secrets import CREDENTIALS

# The project's own files that shape what apply does.
CODE_PATHS = ("ansible.cfg", "playbooks", "roles", "plugins")
ENVIRONMENT_NAME = "MLFLOW_REPLAY_INPUTS_DIGEST"


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        return []
    return sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts)


def _with_variable_dirs(source: Path) -> list[Path]:
    """Return `source` and the group_vars and host_vars directories that Ansible reads beside it."""
    return [source, source.parent / "group_vars", source.parent / "host_vars"]


def inputs_digest(project_root: Path, sources: list[Path], extra: str) -> str:
    """Return a SHA-256 over the code, the files in `sources`, the credentials in the environment and `extra`.

    `sources` are the inventories, the vars file and the secrets file, as
    files or directories; the group_vars and host_vars beside each count too. `extra` is the JSON of the extra vars
    that runner.py passes on the command line. The credentials enter the digest only: it is safe to
    store, and it differs whenever a key does.
    """
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode())
        digest.update(data)

    for name in CODE_PATHS:
        for path in _files(project_root / name):
            add(str(path.relative_to(project_root)), path.read_bytes())
    # Labelled by position, not path: the vars file reaches Ansible through a
    # temporary directory that differs on every run.
    for number, source in enumerate(sources):
        for root in _with_variable_dirs(Path(source)):
            for path in _files(root):
                add(f"source {number} {path.relative_to(root.parent)}", path.read_bytes())
    for _, variable in CREDENTIALS:
        add(variable, os.environ.get(variable, "").encode())
    add("options", extra.encode())
    return digest.hexdigest()
