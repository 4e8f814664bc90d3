"""A local wheelhouse that spares every bench node its own MLflow download.

Each node's first apply runs `pip install mlflow`, about 180 MB of wheels. The
bench downloads them once into the pip cache directory that every node mounts
at /root/.cache/pip, and the node image's /etc/pip.conf names that directory
as `find-links`. pip still reads the package index, but for a version that both
offer it takes the local file, because it ranks local candidates first.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The wheelhouse path inside a node, below the pip cache that the bench binds in.
NODE_WHEELHOUSE = "/root/.cache/pip/wheelhouse"
STAMP_NAME = "complete.txt"


def mlflow_requirement() -> str:
    """Return the MLflow requirement that the replay_mlflow role installs."""
    defaults = yaml.safe_load((PROJECT_ROOT / "roles/replay_mlflow/defaults/main.yml").read_text())
    return f"mlflow=={defaults['replay_mlflow_version']}"


def ensure_wheelhouse(pip_cache_dir: Path) -> Path:
    """Download the MLflow wheels into `pip_cache_dir`/wheelhouse unless they are there.

    A failed download only costs speed: it is logged, and nodes then download
    from the index as they would without the bench.
    """
    wheelhouse = Path(pip_cache_dir) / "wheelhouse"
    requirement = mlflow_requirement()
    stamp = wheelhouse / STAMP_NAME
    if stamp.exists() and stamp.read_text() == requirement:
        return wheelhouse
    wheelhouse.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--dest", str(wheelhouse), requirement],
        capture_output=True, text=True, timeout=900, check=False,
    )
    if result.returncode != 0:
        log.warning("wheelhouse download of %s failed, nodes will use the index: %s",
                    requirement, result.stderr[-2000:])
        return wheelhouse
    stamp.write_text(requirement)
    return wheelhouse
