"""Command line for manual use: `python -m testbench nodes-up --count 2 --inventory FILE`.

To add commands, write a function that takes the argparse subparsers object,
adds its subcommands with `set_defaults(handler=...)`, and append it to
COMMAND_REGISTRARS. A handler receives the parsed arguments and a Bench.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys
from pathlib import Path

from testbench.host import BenchError
from testbench.network import DEFAULT_BRIDGE, DEFAULT_SUBNET
from testbench.nodes import DEFAULT_STATE_DIR, Bench

# Node N gets the subnet's host address 10 + N, so lower addresses stay free
# for namespace hosts such as the S3 server.
FIRST_NODE_OFFSET = 11


def _nodes_up(args: argparse.Namespace, bench: Bench) -> int:
    base = bench.network.subnet.network_address + FIRST_NODE_OFFSET
    pairs = [(f"{args.prefix}{i + 1}", str(ipaddress.IPv4Address(base) + i)) for i in range(args.count)]
    try:
        nodes = bench.boot(pairs, suite=args.suite, docker=args.docker)
    except BenchError:
        bench.shutdown()
        raise
    inventory = bench.write_inventory(args.inventory, nodes)
    for node in nodes:
        print(f"{node.name}\t{node.address}")
    print(f"inventory written to {inventory}")
    return 0


def _nodes_down(args: argparse.Namespace, bench: Bench) -> int:
    bench.shutdown()
    return 0


def register_node_commands(subparsers: argparse._SubParsersAction) -> None:
    up = subparsers.add_parser("nodes-up", help="boot nodes and write an Ansible inventory")
    up.add_argument("--count", type=int, default=1, help="number of nodes to boot (default: 1)")
    up.add_argument("--inventory", type=Path, required=True, help="path of the inventory file to write")
    up.add_argument("--prefix", default="node", help="node name prefix: nodes are named PREFIX1, PREFIX2, ... (default: node)")
    up.add_argument("--suite", default="bookworm", help="Debian suite of the nodes (default: bookworm)")
    up.add_argument("--docker", action="store_true", help="allow running Docker inside the nodes")
    up.set_defaults(handler=_nodes_up)

    down = subparsers.add_parser("nodes-down", help="stop all nodes and remove the network")
    down.set_defaults(handler=_nodes_down)


COMMAND_REGISTRARS = [register_node_commands]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m testbench", description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", type=Path, default=DEFAULT_STATE_DIR,
                        help=f"directory for keys, caches and node state (default: {DEFAULT_STATE_DIR})")
    parser.add_argument("--bridge", default=DEFAULT_BRIDGE, help=f"bridge name (default: {DEFAULT_BRIDGE})")
    parser.add_argument("--subnet", default=DEFAULT_SUBNET, help=f"IPv4 subnet of the bridge (default: {DEFAULT_SUBNET})")
    parser.add_argument("--rootfs-cache-dir", type=Path,
                        help="directory of cached root filesystems (default: STATE_DIR/rootfs)")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for register in COMMAND_REGISTRARS:
        register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        bench = Bench(state_dir=args.state_dir, bridge=args.bridge, subnet=args.subnet,
                      rootfs_cache_dir=args.rootfs_cache_dir)
        return args.handler(args, bench)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
