"""Tests of the nspawn test bench itself: boot, SSH, networking, reboot and cleanup.

They need root, systemd-nspawn and mmdebstrap, and network access to the
Debian archive for the first rootfs build (about 30 s per suite, cached in
/var/lib/mlflow-replay-bench/rootfs afterwards). The tests share one bench
and run in file order, and the crash test near the end tears it down.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from testbench import host
from testbench.network import BridgeNetwork, create_bridge_network, link_exists, netns_exists
from testbench.nodes import DEFAULT_STATE_DIR, Bench

pytestmark = [
    pytest.mark.bench,
    pytest.mark.skipif(
        os.geteuid() != 0 or shutil.which("systemd-nspawn") is None or shutil.which("mmdebstrap") is None,
        reason="needs root, systemd-nspawn and mmdebstrap",
    ),
]

# A bridge and subnet of their own, so these tests never touch the benches of
# tests/conftest.py (mlrbrN with 10.213.N.0/24, N from 0 to 9).
BRIDGE = "mlrselftest"
SUBNET = "10.213.200.0/24"
STATE_DIR = DEFAULT_STATE_DIR / "selftest"
NODES = {"alpha": "10.213.200.11", "beta": "10.213.200.12"}
NETNS_NAME = "mlrselftest-web"
NETNS_ADDRESS = "10.213.200.2"


def make_bench() -> Bench:
    return Bench(
        state_dir=STATE_DIR,
        bridge=BRIDGE,
        subnet=SUBNET,
        rootfs_cache_dir=DEFAULT_STATE_DIR / "rootfs",
        pip_cache_dir=DEFAULT_STATE_DIR / "pip-cache",
    )


@pytest.fixture(scope="module")
def bench():
    bench = make_bench()
    bench.shutdown()  # Clean up after an earlier run that was killed.
    yield bench
    bench.shutdown()


@pytest.fixture(scope="module")
def nodes(bench):
    return {node.name: node for node in bench.boot(NODES)}


def ssh_banner_command(address: str) -> list[str]:
    """Return a command that prints the first bytes sshd at `address` sends."""
    script = (
        "import socket, sys\n"
        "with socket.create_connection((sys.argv[1], 22), timeout=5) as c:\n"
        "    print(c.recv(64).decode().strip())\n"
    )
    return ["python3", "-c", script, address]


def test_nodes_reach_running(nodes):
    for node in nodes.values():
        state = node.run(["systemctl", "is-system-running"], check=False).stdout.strip()
        failed = node.run(["systemctl", "--failed", "--no-legend"], check=False).stdout
        assert state == "running", f"{node.name} is {state}; failed units: {failed}"


def test_nodes_have_distinct_machine_ids(nodes):
    machine_ids = {name: node.run("cat /etc/machine-id").stdout.strip() for name, node in nodes.items()}
    for name, machine_id in machine_ids.items():
        assert re.fullmatch(r"[0-9a-f]{32}", machine_id), f"{name} has machine-id {machine_id!r}"
    assert len(set(machine_ids.values())) == len(nodes), machine_ids


def test_nodes_have_own_hostname_and_address(nodes):
    for name, node in nodes.items():
        assert node.run("hostname").stdout.strip() == name
        addresses = node.run(["ip", "-4", "-o", "addr", "show", "dev", "host0"]).stdout
        assert f"inet {NODES[name]}/24 " in addresses, addresses


def test_nodes_have_distinct_ssh_host_keys(nodes):
    keys = {name: node.run("cat /etc/ssh/ssh_host_ed25519_key.pub").stdout.split()[1] for name, node in nodes.items()}
    assert len(set(keys.values())) == len(nodes), keys


def test_run_rejects_failure_and_passes_input(nodes):
    node = nodes["alpha"]
    assert node.run("cat", input="hello").stdout == "hello"
    assert node.run("exit 3", check=False).returncode == 3
    with pytest.raises(host.BenchError, match="exit code 3"):
        node.run("exit 3")


def test_run_uses_node_environment(nodes):
    environment = nodes["alpha"].run("env").stdout
    assert "AWS_CA_BUNDLE" not in environment
    assert "HOME=/root" in environment


def test_ssh_key_pair_is_private(bench, nodes):
    assert bench.private_key_path.stat().st_mode & 0o777 == 0o600
    listing = nodes["alpha"].run("stat -c '%U %a' /home/cc/.ssh/authorized_keys").stdout.strip()
    assert listing == "cc 600"


def test_ssh_as_cc_with_sudo(bench, nodes):
    for node in nodes.values():
        result = subprocess.run(
            ["ssh", "-i", str(bench.private_key_path),
             "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
             f"cc@{node.address}", "sudo -n true && whoami"],
            capture_output=True, text=True, timeout=60,
        )
        assert result.returncode == 0, f"{node.name}: {result.stderr}"
        assert result.stdout.strip() == "cc"


def test_inventory_works_with_ansible(bench, nodes, tmp_path):
    ansible = Path(sys.executable).parent / "ansible"
    if not ansible.exists():
        pytest.skip(f"ansible not installed next to {sys.executable}")
    inventory = bench.write_inventory(tmp_path / "hosts.ini", nodes.values())

    listed = subprocess.run(
        [str(ansible.parent / "ansible-inventory"), "-i", str(inventory), "--list"],
        capture_output=True, text=True, timeout=60, check=True,
    )
    data = json.loads(listed.stdout)
    assert sorted(data["replay_nodes"]["hosts"]) == sorted(NODES)
    assert data["_meta"]["hostvars"]["alpha"]["ansible_host"] == NODES["alpha"]
    assert data["_meta"]["hostvars"]["alpha"]["ansible_user"] == "cc"

    # No ControlPersist master, so no ssh process outlives this test.
    environment = {**os.environ, "ANSIBLE_SSH_ARGS": "-o ControlMaster=no"}
    pinged = subprocess.run(
        [str(ansible), "-i", str(inventory), "replay_nodes", "--become", "-m", "ansible.builtin.ping"],
        capture_output=True, text=True, timeout=180, env=environment,
    )
    assert pinged.returncode == 0, pinged.stdout + pinged.stderr


def test_nodes_reach_each_other(nodes):
    for name, node in nodes.items():
        for other_name, other_address in NODES.items():
            if other_name == name:
                continue
            banner = node.run(ssh_banner_command(other_address)).stdout
            assert banner.startswith("SSH-"), f"{name} -> {other_name}: {banner!r}"


def test_node_reaches_netns_host(bench, nodes, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the namespace\n")
    netns = bench.create_netns_host(NETNS_NAME, NETNS_ADDRESS)
    server = subprocess.Popen(
        netns.command([sys.executable, "-m", "http.server", "8000", "--bind", NETNS_ADDRESS,
                       "--directory", str(tmp_path)]),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://{NETNS_ADDRESS}:8000/hello.txt"
    try:
        body = None
        deadline = time.monotonic() + 20
        while body is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    body = response.read().decode()
            except OSError:
                time.sleep(0.2)
        assert body == "hello from the namespace\n", "host could not fetch from the namespace"

        fetched = nodes["alpha"].run(
            ["python3", "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=5).read().decode(), end='')"]
        )
        assert fetched.stdout == "hello from the namespace\n"
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=10)


def test_reboot_gives_new_pid1(nodes):
    node = nodes["beta"]
    old_pid1 = node.pid1
    machine_id = node.run("cat /etc/machine-id").stdout

    node.reboot(timeout=120)

    assert node.pid1 != old_pid1
    assert node.run(["systemctl", "is-system-running"], check=False).stdout.strip() == "running"
    assert node.run("cat /etc/machine-id").stdout == machine_id
    assert nodes["alpha"].run(ssh_banner_command(node.address)).stdout.startswith("SSH-")


def test_docker_option_binds_var_lib_docker(bench, nodes):
    [node] = bench.boot({"gamma": "10.213.200.13"}, docker=True)

    source = node.run(["findmnt", "--noheadings", "--output", "SOURCE", "/var/lib/docker"]).stdout
    assert "nodes/gamma/docker" in source
    capabilities = node.run("grep CapEff /proc/1/status").stdout.split()[1]
    alpha_capabilities = nodes["alpha"].run("grep CapEff /proc/1/status").stdout.split()[1]
    assert int(capabilities, 16) > int(alpha_capabilities, 16)


def test_trixie_node_boots(bench, nodes):
    [node] = bench.boot({"delta": "10.213.200.14"}, suite="trixie")

    assert "VERSION_CODENAME=trixie" in node.run("cat /etc/os-release").stdout
    assert node.run(["systemctl", "is-system-running"], check=False).stdout.strip() == "running"


def test_shutdown_cleans_up_crashed_run(bench, nodes):
    """Simulate a crashed bench process, then clean up from a fresh Bench object."""
    records = [json.loads(p.read_text()) for p in (STATE_DIR / "nodes").glob("*/node.json")]
    assert sorted(record["name"] for record in records) == sorted(bench.nodes)
    cgroups = [record["cgroup"] for record in records]
    pids = set()
    for node in bench.nodes.values():
        pids |= {node.loop_pid, node.nspawn_pid, node.pid1}
    pids.discard(None)
    # A hard crash: nspawn of one node dies without shutting its container down.
    os.kill(nodes["alpha"].nspawn_pid, signal.SIGKILL)

    fresh = make_bench()
    fresh.shutdown(timeout=60)

    assert host.mounts_under(STATE_DIR) == []
    assert not (STATE_DIR / "nodes").exists() or list((STATE_DIR / "nodes").iterdir()) == []
    assert not link_exists(BRIDGE)
    assert not netns_exists(NETNS_NAME)
    nat_rules = subprocess.run(["iptables", "-t", "nat", "-S"], capture_output=True, text=True, check=True).stdout
    assert SUBNET not in nat_rules
    for pid in pids:
        host.reap(pid)
        assert not host.process_alive(pid), f"PID {pid} still runs"
    for cgroup in cgroups:
        for hierarchy in host.CGROUP_HIERARCHIES:
            assert not (hierarchy / cgroup).exists()

    fresh.shutdown()  # A second call finds nothing to do.
    bench.shutdown()


def test_leftover_bridge_is_replaced():
    create_bridge_network(BridgeNetwork.parse(BRIDGE, SUBNET))
    bench = make_bench()
    try:
        netns = bench.create_netns_host(NETNS_NAME, NETNS_ADDRESS)
        reply = subprocess.run(netns.command(["ip", "-4", "route", "get", "10.213.200.1"]),
                               capture_output=True, text=True, check=True).stdout
        assert "dev eth0" in reply
    finally:
        bench.shutdown()
    assert not link_exists(BRIDGE)
    assert not netns_exists(NETNS_NAME)


def test_cli_nodes_up_and_down(tmp_path):
    inventory = tmp_path / "hosts.ini"
    common = [sys.executable, "-m", "testbench", "--state-dir", str(STATE_DIR), "--bridge", BRIDGE,
              "--subnet", SUBNET, "--rootfs-cache-dir", str(DEFAULT_STATE_DIR / "rootfs")]
    repo_root = Path(__file__).resolve().parent.parent

    up = subprocess.run([*common, "nodes-up", "--count", "1", "--inventory", str(inventory)],
                        capture_output=True, text=True, timeout=300, cwd=repo_root)
    try:
        assert up.returncode == 0, up.stderr
        assert "node1\t10.213.200.11" in up.stdout
        assert "node1 ansible_host=10.213.200.11" in inventory.read_text()
    finally:
        down = subprocess.run([*common, "nodes-down"], capture_output=True, text=True, timeout=300, cwd=repo_root)
    assert down.returncode == 0, down.stderr
    assert host.mounts_under(STATE_DIR) == []
    assert not link_exists(BRIDGE)
