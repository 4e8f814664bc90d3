"""Boot, drive and tear down systemd-nspawn nodes on the bench bridge.

Each node runs under a small bash loop that first moves itself into a cgroup
of its own and then runs systemd-nspawn, again after every reboot. All state
lives under the bench's state directory, so `Bench.shutdown()` from a new
process also cleans up after a run that crashed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from testbench import host
from testbench.host import BenchError, run
from testbench.network import (
    DEFAULT_BRIDGE,
    DEFAULT_SUBNET,
    BridgeNetwork,
    NetnsHost,
    create_bridge_network,
    create_netns_host,
    destroy_bridge_network,
    link_exists,
    remove_netns_host,
)
from testbench.noderoot import mount_overlay, write_identity
from testbench.rootfs import DEFAULT_MIRROR, build_rootfs

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = Path("/var/lib/mlflow-replay-bench")

# systemd-nspawn exits with this status when the container reboots.
REBOOT_EXIT_STATUS = 133

NODE_NAME = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")

# Environment of commands run inside nodes. It replaces the host's, so host
# settings such as AWS_CA_BUNDLE do not change how node commands behave.
NODE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "LANG": "C.UTF-8",
}

# Without a cgroup of its own, a second nspawn would share (and clash over)
# the cgroup of the first on this cgroup v1 hybrid host.
_LOOP_SCRIPT = f"""
cgroup=$1
shift
for hierarchy in {' '.join(str(h) for h in host.CGROUP_HIERARCHIES)}; do
    mkdir -p "$hierarchy/$cgroup" || exit 1
    echo $$ >"$hierarchy/$cgroup/cgroup.procs" || exit 1
done
while :; do
    systemd-nspawn "$@"
    status=$?
    [ "$status" -eq {REBOOT_EXIT_STATUS} ] || exit "$status"
    echo "testbench: node rebooted, starting systemd-nspawn again"
done
"""

SSH_OPTIONS = ("-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null")


class Node:
    """A booted node: its name, bench address and the processes behind it.

    `loop_pid` is the restart loop. Its child is systemd-nspawn, whose child is
    the node's PID 1. Both of those change on every reboot.
    """

    def __init__(self, name: str, address: str, node_dir: Path, loop_pid: int, loop_start: int):
        self.name = name
        self.address = address
        self.node_dir = node_dir
        self.loop_pid = loop_pid
        self._loop_start = loop_start

    def __repr__(self) -> str:
        return f"Node(name={self.name!r}, address={self.address!r})"

    @property
    def nspawn_pid(self) -> int | None:
        """The PID of the current systemd-nspawn process, or None between boots."""
        if not host.process_alive(self.loop_pid, self._loop_start):
            return None
        for pid in host.child_pids(self.loop_pid):
            if host.process_name(pid) == "systemd-nspawn":
                return pid
        return None

    @property
    def pid1(self) -> int:
        """The host PID of the node's systemd. Raises BenchError while the node is not running."""
        pid = self._find_pid1()
        if pid is None:
            raise BenchError(f"node {self.name} is not running (no systemd process found)")
        return pid

    def _find_pid1(self) -> int | None:
        nspawn = self.nspawn_pid
        if nspawn is None:
            return None
        for pid in host.child_pids(nspawn):
            if host.process_name(pid) == "systemd":
                return pid
        return None

    def run(
        self,
        cmd: str | Sequence[str],
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess:
        """Run `cmd` as root inside the node with nsenter and return its result.

        A string runs with `bash -c`. The command gets NODE_ENV, not the host's
        environment, and stays in the caller's cgroup, so it should not start
        long-running daemons (use `systemctl` or `systemd-run` inside for that).
        Raises BenchError on timeout, or on a non-zero exit if `check` is true.
        """
        argv = ["bash", "-c", cmd] if isinstance(cmd, str) else list(cmd)
        full = ["nsenter", "-t", str(self.pid1), "-a", *argv]
        # nsenter forks to enter the PID namespace, so a timeout must kill the
        # whole process group, not only nsenter itself.
        process = subprocess.Popen(
            full,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=NODE_ENV,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise BenchError(f"command on node {self.name} timed out after {timeout} s: {argv}") from error
        result = subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise BenchError(
                f"command on node {self.name} failed with exit code {result.returncode}: {argv}\n"
                f"stdout: {stdout.strip()[-2000:]}\nstderr: {stderr.strip()[-2000:]}"
            )
        return result

    def wait_running(self, timeout: float = 120) -> None:
        """Wait until systemd reports running or degraded and sshd sends its banner.

        Raises BenchError with the end of the console log on timeout or if the
        restart loop has exited.
        """
        deadline = time.monotonic() + timeout
        state = "not started"
        while state not in ("running", "degraded"):
            self._check_deadline(deadline, f"system state {state!r}")
            if self._find_pid1() is None:
                time.sleep(0.5)
                continue
            remaining = max(1.0, deadline - time.monotonic())
            try:
                result = self.run(["systemctl", "is-system-running", "--wait"], check=False, timeout=remaining)
            except BenchError:
                continue  # PID 1 changed or the command timed out, so let the deadline check decide.
            state = result.stdout.strip() or result.stderr.strip()
            if state not in ("running", "degraded"):
                time.sleep(0.5)
        if state == "degraded":
            failed = self.run(["systemctl", "--failed", "--no-legend", "--plain"], check=False).stdout
            log.warning("node %s is degraded, failed units: %s", self.name, failed.strip())

        while not self._ssh_banner_received():
            self._check_deadline(deadline, "sshd not answering on port 22")
            time.sleep(0.5)

    def _check_deadline(self, deadline: float, waiting_for: str) -> None:
        if not host.process_alive(self.loop_pid, self._loop_start):
            raise BenchError(f"node {self.name} stopped: {self._console_tail()}")
        if time.monotonic() >= deadline:
            raise BenchError(f"timed out waiting for node {self.name}: {waiting_for}\n{self._console_tail()}")

    def _ssh_banner_received(self) -> bool:
        try:
            with socket.create_connection((self.address, 22), timeout=2) as connection:
                return connection.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def _console_tail(self, chars: int = 3000) -> str:
        path = self.node_dir / "console.log"
        if not path.exists():
            return "(no console log)"
        text = path.read_bytes()[-chars:].decode(errors="replace")
        return f"end of {path}:\n{text}"

    def reboot(self, timeout: float = 120) -> None:
        """Run `systemctl reboot` inside and wait for a new PID 1 to reach running."""
        deadline = time.monotonic() + timeout
        old_pid1 = self.pid1
        log.info("rebooting node %s", self.name)
        # The command may lose its connection to systemd when the node goes down.
        self.run(["systemctl", "reboot"], check=False, timeout=timeout)
        while self._find_pid1() in (None, old_pid1):
            self._check_deadline(deadline, "a new PID 1 after reboot")
            time.sleep(0.2)
        self.wait_running(max(1.0, deadline - time.monotonic()))


class Bench:
    """A set of nodes on one bridge, with their SSH key, caches and cleanup.

    Use one Bench per state directory at a time. The SSH key pair, rootfs
    cache and pip cache persist across runs. `shutdown()` removes everything
    else, also what a crashed earlier run left behind.
    """

    def __init__(
        self,
        state_dir: Path = DEFAULT_STATE_DIR,
        bridge: str = DEFAULT_BRIDGE,
        subnet: str = DEFAULT_SUBNET,
        rootfs_cache_dir: Path | None = None,
        pip_cache_dir: Path | None = None,
        mirror: str = DEFAULT_MIRROR,
    ):
        self.state_dir = Path(state_dir)
        self.network = BridgeNetwork.parse(bridge, subnet)
        self.rootfs_cache_dir = Path(rootfs_cache_dir or self.state_dir / "rootfs")
        self.pip_cache_dir = Path(pip_cache_dir or self.state_dir / "pip-cache")
        self.mirror = mirror
        self.nodes: dict[str, Node] = {}
        self._loops: list[subprocess.Popen] = []
        self._network_ready = False

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()

    @property
    def private_key_path(self) -> Path:
        return self.state_dir / "id_ed25519"

    @property
    def _nodes_dir(self) -> Path:
        return self.state_dir / "nodes"

    @property
    def _netns_dir(self) -> Path:
        """Directory with one empty file per network namespace this bench created."""
        return self.state_dir / "netns"

    @property
    def _network_record(self) -> Path:
        return self.state_dir / "network.json"

    # --- setup ---------------------------------------------------------------

    def ensure_ssh_key(self) -> Path:
        """Create the bench's ed25519 key pair unless it exists. Return the private key path."""
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not self.private_key_path.exists():
            run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mlflow-replay-bench",
                 "-f", str(self.private_key_path)])
        self.private_key_path.chmod(0o600)
        return self.private_key_path

    def ensure_network(self) -> None:
        """Create the bridge and NAT unless this Bench already did.

        Before that, removes what a crashed earlier run left in the state
        directory. Raises BenchError if nodes of an earlier run still run.
        """
        if self._network_ready:
            return
        if os.geteuid() != 0:
            raise BenchError("the bench must run as root (it mounts, creates bridges and runs nspawn)")
        live = [record["name"] for record in self._node_records() if _loop_alive(record)]
        if live:
            raise BenchError(
                f"nodes {', '.join(live)} of another Bench or an earlier run are still running under "
                f"{self._nodes_dir}; stop them first with Bench.shutdown() or "
                f"`python -m testbench --state-dir {self.state_dir} --bridge {self.network.bridge} nodes-down`"
            )
        self.shutdown()
        self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        create_bridge_network(self.network)
        self._network_record.write_text(
            json.dumps({"bridge": self.network.bridge, "subnet": str(self.network.subnet)}) + "\n"
        )
        self._network_ready = True

    def create_netns_host(self, name: str, address: str) -> NetnsHost:
        """Create a network namespace at `address` on the bench bridge (see network.create_netns_host).

        `shutdown()` removes it again.
        """
        self.ensure_network()
        address = self.network.check_address(address)
        self._netns_dir.mkdir(exist_ok=True)
        (self._netns_dir / name).touch()
        return create_netns_host(
            name, self.network.bridge, f"{address}/{self.network.prefix_length}", self.network.gateway
        )

    # --- nodes ---------------------------------------------------------------

    def boot(
        self,
        names_and_addresses: Mapping[str, str] | Iterable[tuple[str, str]],
        suite: str = "bookworm",
        docker: bool = False,
        extra_packages: Iterable[str] = (),
        timeout: float = 180,
    ) -> list[Node]:
        """Boot one node per (name, address) pair and wait until all are running.

        Addresses are plain IPv4 addresses in the bench subnet. `docker=True`
        gives each node a /var/lib/docker on the host file system and the
        system calls and capabilities Docker needs. Raises BenchError if a
        name or address is invalid or taken, or if a node fails to come up.
        Nodes started before such an error keep running until `shutdown()`.
        """
        pairs = list(names_and_addresses.items() if isinstance(names_and_addresses, Mapping)
                     else names_and_addresses)
        self._check_new_nodes(pairs)
        self.ensure_network()
        rootfs = build_rootfs(self.rootfs_cache_dir, suite, extra_packages, self.mirror)
        public_key = Path(f"{self.ensure_ssh_key()}.pub").read_text()
        self.pip_cache_dir.mkdir(parents=True, exist_ok=True)

        started = time.monotonic()
        new_nodes = []
        for name, address in pairs:
            node = self._start_node(name, address, rootfs, public_key, docker)
            self.nodes[name] = node
            new_nodes.append(node)
        deadline = time.monotonic() + timeout
        for node in new_nodes:
            node.wait_running(max(1.0, deadline - time.monotonic()))
        log.info("booted %d node(s) in %.1f s", len(new_nodes), time.monotonic() - started)
        return new_nodes

    def _check_new_nodes(self, pairs: list[tuple[str, str]]) -> None:
        names = [name for name, _ in pairs] + list(self.nodes)
        addresses = [self.network.check_address(address) for _, address in pairs]
        addresses += [node.address for node in self.nodes.values()]
        for name, _ in pairs:
            if not NODE_NAME.match(name):
                raise BenchError(
                    f"invalid node name {name!r}: use 1 to 32 lowercase letters, digits and inner hyphens"
                )
        for label, values in (("node name", names), ("address", addresses)):
            duplicates = sorted({value for value in values if values.count(value) > 1})
            if duplicates:
                raise BenchError(f"{label} used twice: {', '.join(duplicates)}")

    def _start_node(self, name: str, address: str, rootfs: Path, public_key: str, docker: bool) -> Node:
        machine = f"{self.network.bridge}-{name}"
        node_dir = self._nodes_dir / name
        record = {"name": name, "address": address, "machine": machine, "cgroup": f"testbench.{machine}"}
        node_dir.mkdir(parents=True)
        _write_record(node_dir, record)

        merged = mount_overlay(rootfs, node_dir)
        write_identity(merged, name, address, self.network.prefix_length, self.network.gateway, public_key)

        nspawn_args = [
            "--quiet", "--boot", "--register=no", "--keep-unit",
            f"--directory={merged}", f"--machine={machine}",
            f"--network-bridge={self.network.bridge}",
            "--console=read-only", "--resolv-conf=copy-host", "--link-journal=no",
            "--bind=/dev/fuse",
            f"--bind={self.pip_cache_dir}:/root/.cache/pip",
        ]
        if docker:
            # Docker's overlay2 driver cannot put its layers on the node's
            # overlayfs, so /var/lib/docker is a host directory.
            docker_dir = node_dir / "docker"
            docker_dir.mkdir()
            nspawn_args += [
                f"--bind={docker_dir}:/var/lib/docker",
                "--system-call-filter=@keyring",
                "--system-call-filter=bpf",
                "--capability=all",
            ]
        env = {
            "PATH": NODE_ENV["PATH"],
            "LANG": "C.UTF-8",
            # Give the container cgroup v2 even on a hybrid host, because systemd
            # 256 and later (trixie has 257) refuse to boot on cgroup v1 by
            # default, as the systemd 256 NEWS states.
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
        }
        log.info("starting node %s at %s", name, address)
        with open(node_dir / "console.log", "ab") as console:
            loop = subprocess.Popen(
                ["bash", "-c", _LOOP_SCRIPT, "testbench-node-loop", record["cgroup"], *nspawn_args],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self._loops.append(loop)
        loop_start = host.process_start_time(loop.pid)
        if loop_start is None:
            raise BenchError(f"node {name} failed to start; see {node_dir / 'console.log'}")
        record.update(loop_pid=loop.pid, loop_start=loop_start)
        _write_record(node_dir, record)
        return Node(name, address, node_dir, loop.pid, loop_start)

    def ssh_args(self, node: Node, user: str = "cc") -> list[str]:
        """Return the ssh command line, without the remote command, for `user` on `node`."""
        return ["ssh", "-i", str(self.private_key_path), *SSH_OPTIONS,
                "-o", "BatchMode=yes", "-o", "LogLevel=ERROR", f"{user}@{node.address}"]

    def write_inventory(self, path: Path, nodes: Iterable[Node] | None = None, group: str = "replay_nodes") -> Path:
        """Write an INI Ansible inventory with `nodes` (default: all) in `group`. Return its path."""
        path = Path(path)
        nodes = list(self.nodes.values() if nodes is None else nodes)
        lines = [f"[{group}]"]
        lines += [f"{node.name} ansible_host={node.address}" for node in nodes]
        lines += [
            "",
            f"[{group}:vars]",
            "ansible_user=cc",
            f"ansible_ssh_private_key_file={self.private_key_path}",
            f"ansible_ssh_common_args='{' '.join(SSH_OPTIONS)}'",
            "ansible_python_interpreter=/usr/bin/python3",
        ]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("\n".join(lines) + "\n")
        return path

    # --- teardown ------------------------------------------------------------

    def shutdown(self, timeout: float = 60) -> None:
        """Stop all nodes of this state directory and remove the network.

        Works from the records on disk, so it also cleans up after a crashed
        run, and skips parts already gone. Nodes get `systemctl poweroff`
        first. Whatever still runs after `timeout` s, or at once for a node
        without a running systemd, is killed by PID, and only processes in a
        node's own cgroup are touched. A node that cannot be cleaned up is
        logged and skipped, and BenchError lists all of them at the end.
        """
        errors = []
        records = self._node_records()
        powering_off = {record["name"]: _request_poweroff(record) for record in records}
        deadline = time.monotonic() + timeout
        for record in records:
            try:
                _stop_node_processes(record, powering_off[record["name"]], deadline)
                _remove_node_veth(record)
                host.remove_cgroup(record["cgroup"])
                host.remove_tree(self._nodes_dir / record["name"])
            except BenchError as error:
                log.error("cleanup of node %s failed: %s", record["name"], error)
                errors.append(error)
        # Directories of a start that crashed before its record was written.
        if self._nodes_dir.exists() and not errors:
            for node_dir in self._nodes_dir.iterdir():
                host.remove_tree(node_dir)
        for loop in self._loops:
            loop.poll()  # The loop was reaped above, so this only updates the Popen object.
        self._loops.clear()
        self.nodes.clear()

        if self._netns_dir.exists():
            for marker in self._netns_dir.iterdir():
                remove_netns_host(marker.name)
                marker.unlink()
        networks = {self.network}
        if self._network_record.exists():
            recorded = json.loads(self._network_record.read_text())
            networks.add(BridgeNetwork.parse(recorded["bridge"], recorded["subnet"]))
        for network in networks:
            destroy_bridge_network(network)
        self._network_record.unlink(missing_ok=True)
        self._network_ready = False
        if errors:
            raise BenchError(f"shutdown left parts of {len(errors)} node(s) behind: "
                             + "; ".join(str(error) for error in errors))

    def _node_records(self) -> list[dict]:
        if not self._nodes_dir.exists():
            return []
        records = []
        for node_dir in sorted(self._nodes_dir.iterdir()):
            try:
                records.append(json.loads((node_dir / "node.json").read_text()))
            except (FileNotFoundError, json.JSONDecodeError):
                log.warning("ignoring %s: no valid node.json", node_dir)
        return records


def _write_record(node_dir: Path, record: dict) -> None:
    temporary = node_dir / "node.json.tmp"
    temporary.write_text(json.dumps(record, indent=2) + "\n")
    temporary.rename(node_dir / "node.json")


def _loop_alive(record: dict) -> bool:
    return "loop_pid" in record and host.process_alive(record["loop_pid"], record["loop_start"])


def _cgroup_pids(cgroup: str) -> set[int]:
    """Return the PIDs in `cgroup` and its sub-cgroups, in both hierarchies."""
    pids = set()
    for hierarchy in host.CGROUP_HIERARCHIES:
        top = hierarchy / cgroup
        if not top.exists():
            continue
        # os.walk skips sub-cgroups that vanish during the walk, unlike Path.rglob.
        for directory, _, _ in os.walk(top):
            try:
                pids.update(int(line) for line in Path(directory, "cgroup.procs").read_text().split())
            except FileNotFoundError:
                pass
    return pids


def _in_cgroup(pid: int, cgroup: str) -> bool:
    """Return whether `pid` still belongs to `cgroup`, so a reused PID is never signalled."""
    try:
        lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return any(
        path == f"/{cgroup}" or path.startswith(f"/{cgroup}/")
        for path in (line.split(":", 2)[2] for line in lines)
    )


def _find_pid1(record: dict) -> int | None:
    """Return the host PID of the node's systemd, found through the node's cgroup."""
    for pid in _cgroup_pids(record["cgroup"]):
        if host.process_name(pid) != "systemd-nspawn":
            continue
        for child in host.child_pids(pid):
            if host.process_name(child) == "systemd":
                return child
    return None


def _request_poweroff(record: dict) -> bool:
    """Run `systemctl poweroff` in the node. Return False if no systemd ran the request."""
    # One run right after boot once got "Failed to connect to bus: Connection
    # refused" from systemctl, so a failed request is retried twice.
    for attempt in range(3):
        pid1 = _find_pid1(record)
        if pid1 is None:
            return False
        if attempt == 0:
            log.info("powering off node %s", record["name"])
        result = run(["nsenter", "-t", str(pid1), "-a", "systemctl", "poweroff"],
                     check=False, timeout=20, env=NODE_ENV)
        if result.returncode == 0:
            return True
        log.warning("poweroff of node %s failed (attempt %d of 3): %s",
                    record["name"], attempt + 1, result.stderr.strip())
        time.sleep(1)
    return False


def _stop_node_processes(record: dict, powering_off: bool, deadline: float) -> None:
    """Wait until the node's cgroup is empty, then kill what is left.

    Waits until `deadline` only if the node is `powering_off`. The restart loop
    is killed first so it cannot start nspawn again. nspawn turns SIGTERM into
    an orderly container shutdown, and SIGKILL follows 10 s later for every
    process left in the cgroup.
    """
    cgroup = record["cgroup"]
    loop_pid = record.get("loop_pid")

    def remaining_pids() -> set[int]:
        if loop_pid is not None:
            host.reap(loop_pid)
        return _cgroup_pids(cgroup)

    if _wait_until_empty(remaining_pids, deadline if powering_off else 0):
        return
    log.warning("node %s did not power off, killing its processes", record["name"])
    if loop_pid is not None:
        host.signal_process(loop_pid, record["loop_start"], signal.SIGKILL)
    for pid in remaining_pids():
        if host.process_name(pid) == "systemd-nspawn" and _in_cgroup(pid, cgroup):
            host.signal_process(pid, None, signal.SIGTERM)
    if _wait_until_empty(remaining_pids, time.monotonic() + 10):
        return
    for pid in remaining_pids():
        if _in_cgroup(pid, cgroup):
            host.signal_process(pid, None, signal.SIGKILL)
    if not _wait_until_empty(remaining_pids, time.monotonic() + 10):
        raise BenchError(f"processes {sorted(remaining_pids())} of node {record['name']} survived SIGKILL")


def _remove_node_veth(record: dict) -> None:
    """Delete the host end of the node's veth pair if it outlived the node.

    The pair normally vanishes with the node's network namespace, but a socket
    still closing inside (for example after SIGKILL) keeps that namespace for
    minutes, and the leftover name would make the next nspawn with this
    machine name fail. nspawn gives the host end the altname "vb-<machine>".
    """
    altname = f"vb-{record['machine']}"
    if link_exists(altname):
        log.info("removing leftover interface %s", altname)
        run(["ip", "link", "del", "dev", altname])


def _wait_until_empty(list_pids, deadline: float) -> bool:
    while list_pids():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.2)
    return True
