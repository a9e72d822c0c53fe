"""Which local address and interface reach a peer: the rendezvous of a multi-node world.

Every rank of a torch.distributed world meets at rank 0's node address (``MASTER_ADDR``,
set by :class:`megatron_rpp.trainer.group.RayWorkerGroup` from Ray's view of the cluster).
gloo and NCCL must then use the network interface that routes to that address
(``GLOO_SOCKET_IFNAME`` / ``NCCL_SOCKET_IFNAME``): loopback cannot cross nodes, and on a
multi-homed node (management Ethernet + a fast fabric) the wrong interface either fails or
is slow. The interface is looked up from the kernel's routing decision (a connected UDP
socket: no packet is sent), so it is right wherever the route is; a variable the user set
always wins.

Also a small CLI for launch scripts (``examples/slurm/ray_cluster.sh``)::

    python -m megatron_rpp.parallel.network ip-toward HOST      # the local IP that reaches HOST
    python -m megatron_rpp.parallel.network iface-toward HOST   # and its interface name
"""
from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys

IFNAME_VARS = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
_SIOCGIFADDR = 0x8915  # linux/sockios.h


def resolve(host: str) -> str:
    """``host`` as an IPv4 address (names through the system resolver, e.g. /etc/hosts)."""
    try:
        return socket.gethostbyname(host)
    except OSError as e:
        raise OSError(f"cannot resolve {host!r}: {e}") from None


def ip_toward(host: str) -> str:
    """The local IPv4 address the kernel would use as source to reach ``host``.

    Connecting a UDP socket only consults the routing table; nothing is sent.
    """
    addr = resolve(host)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))  # any port: no packet leaves on connect()
        except OSError as e:
            raise OSError(f"no route from this node to {host} ({addr}): {e}") from None
        return s.getsockname()[0]


def interface_addresses() -> dict[str, str]:
    """``{interface name: IPv4 address}`` of this network namespace's up interfaces."""
    out = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                req = struct.pack("256s", name.encode()[:15])
                out[name] = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
            except OSError:  # no IPv4 address on this interface
                continue
    return out


def interface_toward(host: str) -> str:
    """The interface whose address is the source for traffic to ``host`` (``lo`` for loopback)."""
    src = ip_toward(host)
    addrs = interface_addresses()
    for name, ip in addrs.items():
        if ip == src:
            return name
    raise OSError(f"the route to {host} uses source {src}, which no interface holds ({addrs})")


def configure_rendezvous(master_port: int) -> dict:
    """Set this rank's rendezvous environment before ``init_process_group``.

    ``MASTER_ADDR`` is rank 0's node address (set by the worker group; 127.0.0.1 when
    absent: a single-process world); ``MASTER_PORT`` is ``master_port``;
    ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` default to the interface that routes
    to ``MASTER_ADDR`` (a value already set, e.g. by the user, is kept). Returns what was
    chosen (for the rank's placement report).
    """
    addr = os.environ.get("MASTER_ADDR") or "127.0.0.1"
    os.environ.update(MASTER_ADDR=addr, MASTER_PORT=str(master_port))
    try:
        iface = interface_toward(addr)
    except OSError as e:  # gloo/NCCL then pick an interface themselves
        print(f"[megatron-rpp] warning: no interface toward MASTER_ADDR: {e}", file=sys.stderr)
        iface = None
    for var in IFNAME_VARS:
        if iface is not None:
            os.environ.setdefault(var, iface)
    return {"master": f"{addr}:{master_port}", "detected_iface": iface,
            **{var.lower(): os.environ.get(var) for var in IFNAME_VARS}}


def free_port_on(addr: str) -> int:
    """A TCP port free right now on the local address ``addr`` (rank 0's rendezvous port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"ip-toward": ip_toward, "iface-toward": interface_toward}
    if len(argv) != 2 or argv[0] not in commands:
        print(f"usage: python -m megatron_rpp.parallel.network {{{'|'.join(commands)}}} HOST", file=sys.stderr)
        return 2
    try:
        print(commands[argv[0]](argv[1]))
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
