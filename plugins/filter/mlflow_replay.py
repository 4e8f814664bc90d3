"""Ansible filters of mlflow-replay.

The parsing lives in the `mlflow_replay` package at the repository root, so
that runner.py and a plain `ansible-playbook` run validate the vars with the
same code. Ansible loads this file by path, not as part of that package, hence
the sys.path entry below.
"""

import sys
from pathlib import Path

from ansible.errors import AnsibleFilterError

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mlflow_replay.config import REPLAY_KEYS, ConfigError, normalise_replays, replay_paths  # noqa: E402


def mlflow_replay_replays(host_vars, layout):
    """Return the normalised replays, or fail the task with the config error.

    `host_vars` is the host's variables (hostvars[inventory_hostname]); only
    the keys of the vars file are read from it.
    """
    settings = {key: host_vars[key] for key in REPLAY_KEYS + ("replays",) if key in host_vars}
    try:
        return normalise_replays(settings, dict(layout))
    except ConfigError as error:
        raise AnsibleFilterError(f"Invalid replay settings: {error}") from None


def mlflow_replay_paths(names, layout):
    """Return the paths and unit names of each replay in `names`."""
    return [replay_paths(name, dict(layout)) for name in names]


def mlflow_replay_installed_names(paths, layout):
    """Return the sorted replay names found among `paths` on a node.

    `paths` are entries of the config and state roots and of
    /etc/systemd/system. A replay name is a directory below a root, or the
    middle part of a '<unit_prefix>-<name>-<role>.service' unit file.
    """
    layout = dict(layout)
    roots = {layout[key].rstrip("/") for key in ("config_root", "state_root")}
    prefix = layout["unit_prefix"] + "-"
    names = set()
    for path in paths:
        parent, _, entry = str(path).rpartition("/")
        if parent in roots:
            names.add(entry)
        elif parent == "/etc/systemd/system" and entry.startswith(prefix):
            stem, _, suffix = entry[len(prefix):].rpartition("-")
            if stem and suffix in ("metrics.service", "artifacts.service", "server.service", "stack.service"):
                names.add(stem)
    return sorted(names)


def mlflow_replay_removed(installed, desired, only, layout):
    """Return the paths of the installed replays to remove.

    `installed` are the replay names found on the node, `desired` the
    replays the vars file keeps (empty in teardown). With `only` non-empty,
    just those names are removed: `runner.py teardown --replay NAME`.
    """
    keep = {replay["name"] for replay in desired}
    names = [name for name in installed if name not in keep and (not only or name in only)]
    return [replay_paths(name, dict(layout)) for name in names]


def mlflow_replay_report(responses, replays, address, facts):
    """Describe each replay for the recap: name, URLs and experiment names.

    `responses` are the experiments/search responses, in the order of `replays`.
    An empty `address` means the node is the control host: the URLs then use
    the node's own IPv4 addresses (never an outside IP-lookup service).
    """
    facts = dict(facts or {})
    if address:
        addresses = [address]
    else:
        addresses = [a for a in facts.get("all_ipv4_addresses", []) if not a.startswith("127.")] or ["127.0.0.1"]
    report = []
    for response, replay in zip(responses, replays):
        experiments = sorted(e.get("name", "") for e in (response or {}).get("experiments", []))
        urls = [f"http://{host}:{replay['port']}/" for host in addresses]
        report.append({
            "name": replay["name"],
            "urls": urls,
            "experiments": experiments,
            "summary": f"replay {replay['name']}: {urls[0]} serves {len(experiments)} experiments: {', '.join(experiments)}",
        })
    return report


class FilterModule:
    def filters(self):
        return {
            "mlflow_replay_replays": mlflow_replay_replays,
            "mlflow_replay_paths": mlflow_replay_paths,
            "mlflow_replay_installed_names": mlflow_replay_installed_names,
            "mlflow_replay_report": mlflow_replay_report,
            "mlflow_replay_removed": mlflow_replay_removed,
        }
