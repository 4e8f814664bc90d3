"""Build the MLflow container image for the docker runtime tests, once per MLflow version.

No container registry is reachable from the bench, and the host has no Docker
engine. So a throwaway node with Docker builds the image from a minimal Debian
root file system (mmdebstrap on the host, `docker import` in the node) plus
`pip install mlflow`, and `docker save` writes it to a tar cached in the bench
state directory. Later runs and test modules reuse the tar: `copy_image_archive`
puts it on a node, where the replay_docker role loads it with `docker load`.

Measured on the 2-core bench host (MLflow 3.17.2): 264 s for a first build,
including the trixie node root file system and the docker.io install, and a
932 MB tar.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from testbench.host import BenchError, run
from testbench.nodes import Bench, Node
from testbench.rootfs import DEFAULT_MIRROR, HOST_CA_DIR

log = logging.getLogger(__name__)

# Name the tests give the image, so it can never be mistaken for the
# registry's image of the same MLflow version.
IMAGE_REPOSITORY = "mlflow-replay-bench/mlflow"
BASE_IMAGE = "mlflow-replay-bench/base:trixie"
BASE_PACKAGES = ("ca-certificates", "python3", "python3-venv")

# Bump when the Dockerfile below changes, so cached archives are rebuilt.
IMAGE_LAYOUT_VERSION = 1

# The image runs the same way as the registry's image: `mlflow` and `python`
# on PATH. pip inside the build verifies HTTPS with the system CA bundle,
# which contains the host proxy's CA.
DOCKERFILE = """\
FROM {base}
RUN python3 -m venv /opt/mlflow \\
 && PIP_CERT=/etc/ssl/certs/ca-certificates.crt /opt/mlflow/bin/pip install --no-cache-dir mlflow=={version}
ENV PATH=/opt/mlflow/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
"""


def image_name(mlflow_version: str) -> str:
    """Return the image reference of the bench image of `mlflow_version`."""
    return f"{IMAGE_REPOSITORY}:{mlflow_version}"


def image_archive_path(bench: Bench, mlflow_version: str) -> Path:
    """Return where the `docker save` tar of `mlflow_version` is cached."""
    return bench.state_dir / "images" / f"mlflow-{mlflow_version}-v{IMAGE_LAYOUT_VERSION}.tar"


def ensure_image_archive(bench: Bench, mlflow_version: str, builder_address: str) -> Path:
    """Return the cached image tar of `mlflow_version`, building it first when missing.

    A build boots a node named `imgbuild` at `builder_address` and powers it
    off afterwards. Raises BenchError when a build step fails.
    """
    archive = image_archive_path(bench, mlflow_version)
    if archive.exists():
        return archive
    archive.parent.mkdir(parents=True, exist_ok=True)
    (builder,) = bench.boot([("imgbuild", builder_address)], suite="trixie", docker=True)
    try:
        _build_in_node(builder, mlflow_version, archive)
    finally:
        builder.run(["systemctl", "poweroff"], check=False, timeout=60)
    return archive


def _build_in_node(builder: Node, mlflow_version: str, archive: Path) -> None:
    log.info("building %s in node %s", image_name(mlflow_version), builder.name)
    builder.run("apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -q -y docker.io",
                timeout=900)
    merged = builder.node_dir / "merged"
    with tempfile.TemporaryDirectory(dir=archive.parent) as scratch:
        base_tar = Path(scratch) / "base.tar"
        _build_base_tar(base_tar)
        shutil.copyfile(base_tar, merged / "root/base.tar")
    build_dir = merged / "root/image"
    build_dir.mkdir()
    (build_dir / "Dockerfile").write_text(DOCKERFILE.format(base=BASE_IMAGE, version=mlflow_version))

    builder.run(["docker", "import", "/root/base.tar", BASE_IMAGE], timeout=300)
    # Host networking: the build reaches PyPI through the node's own route.
    builder.run(["docker", "build", "--network", "host", "-t", image_name(mlflow_version), "/root/image"],
                timeout=1800)
    partial = archive.with_name(archive.name + ".partial")
    with open(partial, "wb") as output:
        saved = subprocess.run(
            ["nsenter", "-t", str(builder.pid1), "-a", "docker", "save", image_name(mlflow_version)],
            stdout=output, stderr=subprocess.PIPE, timeout=900, check=False,
        )
    if saved.returncode != 0:
        partial.unlink()
        raise BenchError(f"docker save failed in node {builder.name}: {saved.stderr.decode()[-2000:]}")
    os.replace(partial, archive)
    log.info("saved %s (%d MB)", archive, archive.stat().st_size // 2**20)


def _build_base_tar(output: Path) -> None:
    """Write a minimal Debian trixie root file system with the host's CA certificates as a tar."""
    hooks = []
    for cert in sorted(HOST_CA_DIR.glob("*.crt")):
        hooks.append(f"--customize-hook=copy-in {cert} /usr/local/share/ca-certificates/")
    hooks.append('--customize-hook=chroot "$1" update-ca-certificates')
    run(["mmdebstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", *hooks,
         "trixie", str(output), DEFAULT_MIRROR], timeout=1800)


def copy_image_archive(node: Node, archive: Path, node_path: str) -> None:
    """Copy the image tar to `node_path` inside `node` (through its root file system)."""
    target = node.node_dir / "merged" / node_path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(archive, target)
