"""The bench network: a Linux bridge with NAT, and network namespaces on it.

Nodes and namespace hosts get addresses in the bridge's subnet and reach each
other over the bridge. The host reaches them through its own address on the
bridge, and MASQUERADE lets them reach the package registries through the host.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from testbench.host import BenchError, run

log = logging.getLogger(__name__)

DEFAULT_BRIDGE = "mlrbr0"
DEFAULT_SUBNET = "10.213.0.0/24"

IFNAME_MAX = 15  # IFNAMSIZ - 1 in the Linux kernel
IP_FORWARD = Path("/proc/sys/net/ipv4/ip_forward")


@dataclass(frozen=True)
class BridgeNetwork:
    """A bridge and its IPv4 subnet. The host owns the subnet's first address."""

    bridge: str
    subnet: ipaddress.IPv4Network

    @classmethod
    def parse(cls, bridge: str = DEFAULT_BRIDGE, subnet: str = DEFAULT_SUBNET) -> BridgeNetwork:
        """Validate the bridge name and subnet. Raise BenchError if either is invalid."""
        if not 0 < len(bridge) <= IFNAME_MAX or "/" in bridge or " " in bridge:
            raise BenchError(f"invalid bridge name {bridge!r}: use 1 to {IFNAME_MAX} characters")
        try:
            network = ipaddress.IPv4Network(subnet)
        except ValueError as error:
            raise BenchError(f"invalid subnet {subnet!r}: {error}") from error
        if network.num_addresses < 4:
            raise BenchError(f"subnet {subnet} is too small: use /30 or larger")
        return cls(bridge, network)

    @property
    def gateway(self) -> str:
        """The host's address on the bridge, which nodes use as default route."""
        return str(self.subnet.network_address + 1)

    @property
    def prefix_length(self) -> int:
        return self.subnet.prefixlen

    def check_address(self, address: str) -> str:
        """Return `address` if nodes may use it in the subnet, else raise BenchError."""
        try:
            parsed = ipaddress.IPv4Address(address)
        except ValueError as error:
            raise BenchError(f"invalid IPv4 address {address!r}") from error
        if parsed not in self.subnet:
            raise BenchError(f"address {address} is outside the bench subnet {self.subnet}")
        if parsed in (self.subnet.network_address, self.subnet.broadcast_address):
            raise BenchError(f"address {address} is the network or broadcast address of {self.subnet}")
        if str(parsed) == self.gateway:
            raise BenchError(f"address {address} is the host's address on the bridge; pick another one")
        return str(parsed)


def link_exists(name: str) -> bool:
    return run(["ip", "link", "show", "dev", name], check=False).returncode == 0


def _nat_rule(network: BridgeNetwork) -> list[str]:
    return [
        "POSTROUTING", "-s", str(network.subnet), "!", "-o", network.bridge, "-j", "MASQUERADE",
    ]


def create_bridge_network(network: BridgeNetwork) -> None:
    """Create the bridge with the host address, enable forwarding and add the NAT rule.

    Raises BenchError if a link with the bridge's name already exists.
    NOTE: IPv4 forwarding stays enabled after teardown because other bridges
    on the host may rely on it.
    """
    if link_exists(network.bridge):
        raise BenchError(
            f"network interface {network.bridge} already exists; "
            f"remove it with `ip link del {network.bridge}` or run `python -m testbench nodes-down`"
        )
    log.info("creating bridge %s with %s/%d", network.bridge, network.gateway, network.prefix_length)
    run(["ip", "link", "add", "name", network.bridge, "type", "bridge", "forward_delay", "0"])
    run(["ip", "addr", "add", f"{network.gateway}/{network.prefix_length}", "dev", network.bridge])
    run(["ip", "link", "set", network.bridge, "up"])

    if IP_FORWARD.read_text().strip() != "1":
        log.info("enabling IPv4 forwarding")
        IP_FORWARD.write_text("1\n")
    rule = _nat_rule(network)
    if run(["iptables", "-t", "nat", "-C", *rule], check=False).returncode != 0:
        run(["iptables", "-t", "nat", "-A", *rule])


def destroy_bridge_network(network: BridgeNetwork) -> None:
    """Remove the NAT rule and the bridge, skipping parts already gone."""
    rule = _nat_rule(network)
    while run(["iptables", "-t", "nat", "-C", *rule], check=False).returncode == 0:
        log.info("removing NAT rule for %s", network.subnet)
        run(["iptables", "-t", "nat", "-D", *rule])
    if link_exists(network.bridge):
        log.info("removing bridge %s", network.bridge)
        run(["ip", "link", "del", "dev", network.bridge])


# --- network namespace hosts --------------------------------------------------


@dataclass(frozen=True)
class NetnsHost:
    """A network namespace attached to the bench bridge by a veth pair.

    `veth` is the host-side end on the bridge, and the namespace side is `eth0`.
    """

    name: str
    address: str
    veth: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """Return `argv` prefixed so that it runs inside the namespace."""
        return ["ip", "netns", "exec", self.name, *argv]


def _veth_name(netns_name: str) -> str:
    name = f"vn-{netns_name}"
    if len(name) > IFNAME_MAX:
        name = "vn-" + hashlib.sha256(netns_name.encode()).hexdigest()[: IFNAME_MAX - 3]
    return name


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()


def create_netns_host(name: str, bridge: str, address_cidr: str, gateway: str) -> NetnsHost:
    """Create namespace `name` with `address_cidr` on eth0, bridged to `bridge`.

    Loopback is up and the default route goes via `gateway`, the host's address
    on the bridge. Raises BenchError if the namespace already exists.
    """
    if netns_exists(name):
        raise BenchError(f"network namespace {name} already exists; remove it first")
    try:
        interface = ipaddress.IPv4Interface(address_cidr)
    except ValueError as error:
        raise BenchError(f"invalid address {address_cidr!r}: expected e.g. 10.213.0.2/24") from error
    veth = _veth_name(name)
    log.info("creating network namespace %s with %s on %s", name, address_cidr, bridge)
    run(["ip", "netns", "add", name])
    try:
        run(["ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", name])
        run(["ip", "link", "set", veth, "master", bridge, "up"])
        run(["ip", "-n", name, "link", "set", "lo", "up"])
        run(["ip", "-n", name, "addr", "add", address_cidr, "dev", "eth0"])
        run(["ip", "-n", name, "link", "set", "eth0", "up"])
        run(["ip", "-n", name, "route", "add", "default", "via", gateway])
    except BenchError:
        remove_netns_host(name)
        raise
    return NetnsHost(name=name, address=str(interface.ip), veth=veth)


def remove_netns_host(name: str) -> None:
    """Delete the namespace and its veth pair, skipping parts already gone.

    Processes still running inside keep the namespace alive, unnamed, until they
    exit, so their owner must stop them first. They are logged, not killed.
    """
    if netns_exists(name):
        pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
        if pids:
            log.warning("network namespace %s still has processes %s", name, " ".join(pids))
    veth = _veth_name(name)
    if link_exists(veth):
        run(["ip", "link", "del", "dev", veth])
    if netns_exists(name):
        log.info("removing network namespace %s", name)
        run(["ip", "netns", "del", name])
