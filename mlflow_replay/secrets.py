"""The secrets file of runner.py: an extra vars file, usually ansible-vault encrypted."""

from __future__ import annotations

import os
from pathlib import Path

from mlflow_replay.config import ConfigError

# Variables of the mlflow_replay role that a secrets file may set, and the
# environment variables that the role's defaults read otherwise.
CREDENTIALS = (
    ("mlflow_replay_access_key_id", "AWS_ACCESS_KEY_ID"),
    ("mlflow_replay_secret_access_key", "AWS_SECRET_ACCESS_KEY"),
)


def vault_password_file(option: Path | None) -> Path | None:
    """Return --vault-password-file, else $ANSIBLE_VAULT_PASSWORD_FILE, else None."""
    if option is not None:
        return option
    from_env = os.environ.get("ANSIBLE_VAULT_PASSWORD_FILE")
    return Path(from_env) if from_env else None


def load_secrets(path: Path, password_file: Path | None) -> dict:
    """Decrypt (when encrypted) and parse the secrets file; raise ConfigError if invalid.

    Uses Ansible's own loader, so a password file may also be a script, as
    with ansible-playbook --vault-password-file.
    """
    from ansible.errors import AnsibleError
    from ansible.parsing.dataloader import DataLoader
    from ansible.parsing.vault import get_file_vault_secret, is_encrypted_file

    if not path.is_file():
        raise ConfigError("--secrets", str(path), "is not a file", "Pass the path of a vars file with the credentials.")
    loader = DataLoader()
    with open(path, "rb") as handle:
        encrypted = is_encrypted_file(handle)
    if encrypted:
        if password_file is None:
            raise ConfigError("--secrets", str(path), "is vault-encrypted and no vault password was given",
                              "Pass --vault-password-file FILE or set ANSIBLE_VAULT_PASSWORD_FILE.")
        try:
            secret = get_file_vault_secret(filename=str(password_file), vault_id="default", loader=loader)
            secret.load()
        except AnsibleError as error:
            raise ConfigError("--vault-password-file", str(password_file), f"cannot be read ({error.message})",
                              "Pass a file whose first line is the vault password.") from None
        loader.set_vault_secrets([("default", secret)])
    try:
        data = loader.load_from_file(str(path))
    except AnsibleError as error:
        raise ConfigError("--secrets", str(path), f"cannot be loaded ({error.message})",
                          "Check the vault password, or that the file is YAML.") from None
    if not isinstance(data, dict):
        raise ConfigError("--secrets", str(path), "is not a mapping of variables",
                          "Write it as 'mlflow_replay_secret_access_key: ...' lines.")
    return {str(key): value for key, value in data.items()}


def secret_values(secrets: dict) -> list[str]:
    """Return every string value in `secrets` and the credential env vars, for scrubbing logs."""
    values = [os.environ.get(env, "") for _, env in CREDENTIALS]
    pending = list(secrets.values())
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending.extend(value.values())
        elif isinstance(value, (list, tuple)):
            pending.extend(value)
        elif value is not None and not isinstance(value, bool):
            values.append(str(value))
    return [value for value in values if value]


def missing_credentials(secrets: dict) -> list[str]:
    """Return the environment variables still needed: set neither there nor in `secrets`."""
    return [env for variable, env in CREDENTIALS if not secrets.get(variable) and not os.environ.get(env)]
