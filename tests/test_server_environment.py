"""The servers start uvicorn with MLflow's internal variables: check them against the pinned MLflow.

`mlflow server` reads its options and hands them to its uvicorn child in
environment variables whose names are internal to MLflow. The replay's
servers skip that parent process and set the variables themselves
(`mlflow_replay_server_environment`), so a release that renames one would
start a server that silently serves an empty default store. These tests read
the names from the MLflow installed next to them, which requirements-test.txt
pins to the release that the nodes run, and fail when the pins drift apart.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import yaml
from mlflow.server import constants

ROOT = Path(__file__).resolve().parent.parent


def load_yaml(relative: str) -> dict:
    return yaml.safe_load((ROOT / relative).read_text())


def server_environment() -> dict:
    return load_yaml("roles/mlflow_replay/vars/main.yml")["mlflow_replay_server_environment"]


def test_test_mlflow_is_the_node_release():
    node_version = load_yaml("roles/replay_mlflow/defaults/main.yml")["replay_mlflow_version"]
    image = load_yaml("roles/replay_docker/defaults/main.yml")["replay_docker_image"]

    assert mlflow.__version__ == str(node_version)
    assert image.endswith(f":v{node_version}")


def test_internal_names_are_the_ones_mlflow_reads():
    expected = {
        constants.BACKEND_STORE_URI_ENV_VAR,
        constants.REGISTRY_STORE_URI_ENV_VAR,
        constants.SERVE_ARTIFACTS_ENV_VAR,
        constants.ARTIFACT_ROOT_ENV_VAR,
        constants.ARTIFACTS_DESTINATION_ENV_VAR,
    }

    internal = {name for name in server_environment() if name.startswith("_MLFLOW_SERVER_")}

    assert internal == expected


def test_server_interface_name_is_mlflows():
    from mlflow.environment_variables import _MLFLOW_SGI_NAME

    assert server_environment()[_MLFLOW_SGI_NAME.name] == "uvicorn"


def test_app_path_names_mlflows_app():
    module_name, attribute = load_yaml("roles/mlflow_replay/vars/main.yml")["mlflow_replay_server_app"].split(":")
    module = __import__(module_name, fromlist=[attribute])

    assert getattr(module, attribute) is not None


def test_public_names_are_mlflow_settings():
    from mlflow import environment_variables

    declared = {
        setting.name
        for setting in vars(environment_variables).values()
        if isinstance(setting, environment_variables._EnvironmentVariable)
    }
    public = {name for name in server_environment() if not name.startswith("_")}

    assert public - declared == set()
