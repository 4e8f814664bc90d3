"""Boot throwaway systemd hosts with systemd-nspawn for the end-to-end tests.

`Bench` (in `testbench.nodes`) builds a cached Debian root filesystem, puts the
nodes on a private bridge with NAT to the package registries, and tears all of
it down again. Everything here must run as root on a Linux host.
"""

from testbench.host import BenchError
from testbench.network import NetnsHost, create_netns_host, remove_netns_host
from testbench.nodes import Bench, Node
from testbench.rootfs import build_rootfs

__all__ = [
    "Bench",
    "BenchError",
    "NetnsHost",
    "Node",
    "build_rootfs",
    "create_netns_host",
    "remove_netns_host",
]
