"""Per-run debug log of runner.py: private, rotated, scrubbed of secrets."""

from __future__ import annotations

import os
import time
from pathlib import Path

KEEP_LOGS = 20
MASK = "********"


def log_directory() -> Path:
    """Return $XDG_STATE_HOME/mlflow-replay/logs, by default under ~/.local/state."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "mlflow-replay" / "logs"


class RunLog:
    """A log file at mode 0600 in a 0700 directory; the last KEEP_LOGS are kept.

    Every line written goes through `scrub`, which replaces each secret value
    (credential variables and every value of the secrets file) by MASK.
    """

    def __init__(self, command: str, secrets: list[str], directory: Path | None = None, keep: int = KEEP_LOGS):
        self.directory = directory or log_directory()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        # Longest first, so a secret that contains another is masked whole.
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        self.path = self._create(f"{stamp}-{command}")
        self._rotate(keep)

    def _create(self, stem: str) -> Path:
        for attempt in range(100):
            path = self.directory / (f"{stem}.log" if attempt == 0 else f"{stem}-{attempt}.log")
            try:
                descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue
            self._file = os.fdopen(descriptor, "w", encoding="utf-8")
            return path
        raise FileExistsError(f"{self.directory}: 100 logs named {stem}*.log already exist")

    def _rotate(self, keep: int) -> None:
        logs = sorted(self.directory.glob("*.log"), key=lambda p: p.stat().st_mtime)
        for old in logs[:-keep]:
            old.unlink(missing_ok=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, MASK)
        return text

    def write(self, text: str) -> None:
        self._file.write(self.scrub(text.rstrip("\n")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
