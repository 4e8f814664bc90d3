"""Read and validate a vars file on the control host, before any node is touched."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

from mlflow_replay.config import ConfigError, check_known_keys, normalise_replays

# The role defaults of mlflow_replay; validation needs only their shape.
DEFAULT_LAYOUT = {
    "config_root": "/etc/mlflow-replay",
    "state_root": "/var/lib/mlflow-replay",
    "cache_root": "/var/cache/mlflow-replay",
    "mount_root": "/srv/mlflow-replay",
    "unit_prefix": "mlflow-replay",
}


def load_vars(path: Path) -> dict:
    """Return the mapping in the YAML file `path`, or raise ConfigError."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise ConfigError("vars file", str(path), f"cannot be read ({error.strerror})",
                          "Pass an existing file with --vars.") from None
    except UnicodeDecodeError:
        raise ConfigError("vars file", str(path), "is not UTF-8 text", "Save it as UTF-8.") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError("vars file", str(path), f"is not valid YAML{where}",
                          "Fix the syntax; `key: value` per line.") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError("vars file", str(path), "must be a mapping of keys to values",
                          "See vars/replay.yml for an example.")
    return data


def validate_vars_file(path: Path) -> list[dict]:
    """Return the replays that the vars file describes, or raise ConfigError.

    Unlike the Ansible filter, which picks the known keys out of all host
    variables, this reads the file alone, so it also rejects unknown keys.
    """
    settings = load_vars(path)
    check_known_keys(settings)
    return normalise_replays(settings, DEFAULT_LAYOUT)


# Group of the nodes that apply and teardown act on (`hosts:` of both playbooks).
NODE_GROUP = "replay_nodes"
PLUGIN_FAILURE = re.compile(r"Failed to parse inventory with '(?P<plugin>[^']+)' plugin: (?P<reason>.+)")


def _group_hosts(groups: dict, name: str, seen: set[str]) -> set[str]:
    """Return the hosts of group `name` and of its child groups in `ansible-inventory --list` output."""
    if name in seen:
        return set()
    seen.add(name)
    group = groups.get(name) or {}
    hosts = set(group.get("hosts", []))
    for child in group.get("children", []):
        hosts |= _group_hosts(groups, child, seen)
    return hosts


def check_inventory(path: Path) -> list[str]:
    """Return the hosts of the replay_nodes group in the inventory `path`, or raise ConfigError.

    The inventory is read by `ansible-inventory`, so every format that
    ansible-playbook accepts (YAML, INI) is read the same way here.
    """
    binary = Path(sys.executable).parent / "ansible-inventory"
    command = [str(binary) if binary.exists() else "ansible-inventory", "--inventory", str(path), "--list"]
    environment = {
        **os.environ,
        "ANSIBLE_CONFIG": str(Path(__file__).resolve().parent.parent / "ansible.cfg"),
        "ANSIBLE_INVENTORY_UNPARSED_FAILED": "1",
        "ANSIBLE_NOCOLOR": "1",
    }
    try:
        listed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise ConfigError("--inventory", str(path), f"could not be read with ansible-inventory ({error})",
                          "Check that Ansible is installed (pip install -r requirements.txt).") from None
    if listed.returncode != 0:
        reasons = {match["plugin"]: match["reason"].strip() for match in PLUGIN_FAILURE.finditer(listed.stderr)}
        plugin = "yaml" if path.suffix in (".yml", ".yaml") else "ini"
        reason = reasons.get(plugin) or next(iter(reasons.values()), "") or listed.stderr.strip()[-300:]
        raise ConfigError("--inventory", str(path), f"is not a valid YAML or INI inventory ({reason})",
                          "Fix the syntax; see inventory/local.yml for an example.")
    hosts = _group_hosts(json.loads(listed.stdout), NODE_GROUP, set())
    if not hosts:
        raise ConfigError("--inventory", str(path), f"has no host in the group {NODE_GROUP}",
                          f"List the nodes under the group {NODE_GROUP}, as in inventory/local.yml.")
    return sorted(hosts)
