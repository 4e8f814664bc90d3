"""ansible-lint with the production profile must report nothing."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def test_ansible_lint_production_profile():
    lint = Path(sys.executable).parent / "ansible-lint"

    result = subprocess.run(
        [str(lint), "--offline", "--nocolor", "--profile", "production", "playbooks/", "roles/"],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600, check=False,
    )

    assert result.returncode == 0, result.stdout + result.stderr
