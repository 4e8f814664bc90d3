"""Read and validate a vars file on the control host, before any node is touched."""

from __future__ import annotations

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
    variables, this sees the file alone, so it also rejects unknown keys.
    """
    settings = load_vars(path)
    check_known_keys(settings)
    return normalise_replays(settings, DEFAULT_LAYOUT)
