"""Filters that list what the replay_record role checks on a node: units, commands and URLs."""

from __future__ import annotations


def mlflow_replay_record_units(replays, unit_prefix):
    """Return the systemd units that run `replays`: mounts, native servers or docker stacks, nginx, docker."""
    units = [mount["unit"] for replay in replays for mount in replay["mounts"]]
    for replay in replays:
        if replay["runtime"] == "native":
            units.append(replay["server_unit"])
        else:
            units.append(f"{unit_prefix}-{replay['name']}-stack.service")
    units.append("nginx.service")
    if any(replay["runtime"] == "docker" for replay in replays):
        units.append("docker.service")
    return units


def mlflow_replay_check_only_command(replay, script, rclone):
    """Return the argument list that checks whether `replay`'s store changed since its import.

    --check-only lists the store and compares it with the fingerprint of the
    last import. It needs no MLflow, so the node's own python3 runs it for
    both runtimes.
    """
    return [
        "/usr/bin/python3", script, "--check-only",
        f"--rclone={rclone}",
        f"--rclone-config={replay['rclone_config']}",
        f"--source=store:{replay['metrics']['remote_path']}",
        f"--mirror={replay['mirror_dir']}",
        f"--database={replay['database']}",
        f"--fingerprint={replay['fingerprint_file']}",
        "--mlflow=mlflow",
    ]


def mlflow_replay_health_urls(replay, tls):
    """Return the health URLs of `replay`'s server and of the guard in front of it, with the accepted status codes.

    The guard returns 401 when basic auth is on.
    """
    scheme = "https" if tls else "http"
    return [
        {"url": f"http://127.0.0.1:{replay['server_port']}/health", "status": [200]},
        {"url": f"{scheme}://127.0.0.1:{replay['port']}/health", "status": [200, 401]},
    ]


class FilterModule:
    def filters(self):
        return {
            "mlflow_replay_record_units": mlflow_replay_record_units,
            "mlflow_replay_check_only_command": mlflow_replay_check_only_command,
            "mlflow_replay_health_urls": mlflow_replay_health_urls,
        }
