"""The README's first command: replay a small sample store and print its URL.

`python -m testbench.demo up` publishes the sample store (logged by a real
MLflow server) to a local moto S3 server and runs `runner.py apply` against
it: on this machine when systemd runs it, otherwise on a throwaway systemd
node booted with systemd-nspawn. `python -m testbench.demo down` runs
`runner.py teardown` and stops everything the demo started. The servers keep
running between the two commands; their PIDs are kept in the state file.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from testbench.nodes import Bench
from testbench.s3 import start_s3_server
from testbench.store import publish_sample_store

PROJECT_ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = Path(os.environ.get("MLFLOW_REPLAY_DEMO_DIR", "/var/lib/mlflow-replay-demo"))
STATE_FILE = STATE_DIR / "demo.json"
# Work directory where the sample store is logged before it is published.
STORE_DIR = STATE_DIR / "store"
# A network of its own, so the demo and the test bench can run side by side.
BRIDGE = "mlrdemo0"
SUBNET = "10.213.100.0/24"
NODE = ("demo-node", "10.213.100.11")
S3_NETNS = ("mlrb-demo-s3", "10.213.100.2")
S3_PORT = 9000
METRICS_BUCKET = "demo-mlruns"
ARTIFACTS_BUCKET = "demo-artifacts"


def systemd_is_running() -> bool:
    """Return True when this machine's init is systemd (sd_booted(3))."""
    return Path("/run/systemd/system").is_dir()


def runner(command: str, inventory: Path, vars_file: Path, credentials: dict) -> int:
    """Run `runner.py COMMAND` with the demo's files; return its exit code."""
    environment = {k: v for k, v in os.environ.items() if k != "AWS_CA_BUNDLE"}
    environment.update(credentials)
    return subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "runner.py"), command,
         "--inventory", str(inventory), "--vars", str(vars_file)],
        env=environment, check=False,
    ).returncode


def start(state: dict) -> int:
    STATE_DIR.mkdir(mode=0o700, parents=True, exist_ok=True)
    local = systemd_is_running()
    state["mode"] = "local" if local else "node"
    if local:
        inventory = PROJECT_ROOT / "inventory" / "local.yml"
        s3 = start_s3_server("127.0.0.1", S3_PORT, log_path=STATE_DIR / "moto.log")
    else:
        print(f"demo: this machine does not run systemd; booting the throwaway node {NODE[0]} ({NODE[1]})")
        bench = Bench(state_dir=STATE_DIR / "bench", bridge=BRIDGE, subnet=SUBNET)
        bench.shutdown()
        (node,) = bench.boot([NODE])
        bench.create_netns_host(*S3_NETNS)
        s3 = start_s3_server(S3_NETNS[1], S3_PORT, netns=S3_NETNS[0], log_path=STATE_DIR / "moto.log")
        inventory = bench.write_inventory(STATE_DIR / "inventory.ini", [node])
    state.update(s3_pid=s3.pid, inventory=str(inventory))
    save(state)

    print(f"demo: publishing the sample store to {s3.endpoint}")
    # The S3 server starts empty, and publish_sample_store rejects a work
    # directory that an earlier run filled.
    shutil.rmtree(STORE_DIR, ignore_errors=True)
    manifest = publish_sample_store(s3, METRICS_BUCKET, ARTIFACTS_BUCKET, STORE_DIR)
    vars_file = STATE_DIR / "replay.yml"
    vars_file.write_text(yaml.safe_dump({
        "name": "demo",
        "metrics_container": METRICS_BUCKET,
        "artifacts_container": ARTIFACTS_BUCKET,
        "endpoint": s3.endpoint,
        "port": 8000,
        # The docker runtime pulls the MLflow image from a container
        # registry; the native one needs only PyPI, so the demo runs anywhere.
        "runtime": "native",
    }))
    state.update(vars_file=str(vars_file), credentials={
        "AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key,
    })
    save(state)
    print(f"demo: the store holds {len(manifest.experiments)} experiments and {len(manifest.runs)} runs")
    code = runner("apply", inventory, vars_file, state["credentials"])
    print("\ndemo: stop it with `scripts/demo.sh down`")
    return code


def stop(state: dict) -> int:
    code = 0
    if state.get("inventory") and state.get("vars_file"):
        code = runner("teardown", Path(state["inventory"]), Path(state["vars_file"]), state.get("credentials", {}))
    pid = state.get("s3_pid")
    if pid:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if state.get("mode") == "node":
        Bench(state_dir=STATE_DIR / "bench", bridge=BRIDGE, subnet=SUBNET).shutdown()
    shutil.rmtree(STORE_DIR, ignore_errors=True)
    STATE_FILE.unlink(missing_ok=True)
    print("demo: stopped")
    return code


def save(state: dict) -> None:
    STATE_FILE.write_text(json.dumps(state))
    os.chmod(STATE_FILE, 0o600)


def main(argv: list[str]) -> int:
    if os.geteuid() != 0:
        print("demo: run as root (it boots a systemd node or installs units on this machine)", file=sys.stderr)
        return 2
    state = json.loads(STATE_FILE.read_text()) if STATE_FILE.exists() else {}
    command = argv[0] if argv else "up"
    if command == "down":
        return stop(state)
    if command == "up":
        if state:
            stop(state)
            state = {}
        return start(state)
    print(f"demo: unknown command {command!r}; use 'up' or 'down'", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
