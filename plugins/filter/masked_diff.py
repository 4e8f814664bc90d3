"""A diff of two INI-style config texts that never shows a secret value.

The task that writes rclone.conf runs with no_log, so `--diff` cannot show
its change. This filter gives `apply --check --diff` a diff of it in which
every secret value is replaced by a marker, and a changed secret is marked as
changed, so that a key rotation still shows up.
"""

from __future__ import annotations

import difflib
import re

# rclone option names whose values are credentials.
SECRET_OPTIONS = ("access_key_id", "secret_access_key", "session_token", "password", "key", "pass")
HIDDEN = "<hidden>"
HIDDEN_CHANGED = "<hidden, changed>"
_OPTION_LINE = re.compile(r"^(?P<lead>\s*(?P<option>[A-Za-z_]+)\s*=\s*)(?P<value>.*)$")


def _secret_values(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match["option"] in SECRET_OPTIONS:
            values[match["option"]] = match["value"]
    return values


def _mask(text: str, markers: dict[str, str]) -> list[str]:
    lines = []
    for line in text.splitlines():
        match = _OPTION_LINE.match(line)
        if match and match["option"] in SECRET_OPTIONS:
            line = match["lead"] + markers.get(match["option"], HIDDEN)
        lines.append(line)
    return lines


def mlflow_replay_masked_diff(before: str, after: str, path: str = "rclone.conf") -> str:
    """Return a unified diff from `before` to `after` with every secret value hidden.

    A secret option whose value differs between the two texts reads
    "<hidden, changed>" on the `after` side. Returns "" when the masked texts
    are equal and no secret changed.
    """
    old_secrets, new_secrets = _secret_values(before or ""), _secret_values(after or "")
    changed = {option: HIDDEN_CHANGED for option, value in new_secrets.items() if old_secrets.get(option) != value}
    diff = difflib.unified_diff(
        _mask(before or "", {}), _mask(after or "", changed),
        fromfile=f"{path} (now)", tofile=f"{path} (after apply)", lineterm="",
    )
    return "\n".join(diff)


class FilterModule:
    def filters(self):
        return {"mlflow_replay_masked_diff": mlflow_replay_masked_diff}
