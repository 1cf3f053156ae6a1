"""Where the ranks run: `--hosts` or an mlx.launch hostfile, and the ring backend's address list.

Rank 0 is this process, on the first host; rank r runs on the r-th. A host is a name or address
that `ssh` reaches (127.0.0.1 and localhost run as local processes). The ring backend listens on
one address per rank: on loopback a free port each, on other hosts `base_port + rank`.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

LOCAL = ("127.0.0.1", "localhost", "::1")
BASE_PORT = 32323


@dataclass(frozen=True)
class Host:
    ssh: str  # how to reach it ("127.0.0.1": a local process)
    ip: str  # the address the ring backend uses

    @property
    def local(self) -> bool:
        return self.ssh in LOCAL


def parse_hosts(text: str) -> list[Host]:
    """`--hosts H1,H2,...`: each host reached by ssh under that name, and at that address."""
    names = [h.strip() for h in text.split(",")]
    if len(names) < 2 or not all(names):
        raise ValueError(f"--hosts wants two or more comma-separated hosts, not {text!r}")
    return [Host(n, n) for n in names]


def read_hostfile(path: Path) -> list[Host]:
    """mlx.launch's hostfile (read by MLX's own parser): {"backend", "envs", "hosts": [{"ssh": name,
    "ips": [address, ...]}, ...]}, or the list of hosts alone, as `mlx.distributed_config` writes it."""
    from mlx._distributed_utils.common import Hostfile

    try:
        parsed = Hostfile.from_file(path)
    except ValueError as e:
        raise ValueError(f"{path}: not an mlx.launch hostfile: {e}") from None
    if parsed.backend not in ("", "ring"):
        raise ValueError(f"{path}: mtpd runs MLX's ring backend, not {parsed.backend!r}")
    if parsed.envs:
        raise ValueError(f"{path}: set environment variables ({', '.join(parsed.envs)}) in the service's environment instead")
    hosts = [Host(h.ssh_hostname, (h.ips or [h.ssh_hostname])[0]) for h in parsed.hosts]
    if len(hosts) < 2:
        raise ValueError(f"{path}: a cluster needs two or more hosts")
    return hosts


def free_ports(n: int) -> list[int]:
    """`n` TCP ports free on loopback now."""
    sockets = [socket.socket() for _ in range(n)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def loopback_ring(n: int) -> list[list[str]]:
    """The ring backend's addresses for `n` processes on this machine."""
    return ring_addresses([Host(LOCAL[0], LOCAL[0])] * n)


def ring_addresses(hosts: list[Host], base_port: int = BASE_PORT) -> list[list[str]]:
    """The ring backend's hostfile (MLX_HOSTFILE): one [ip:port] per rank."""
    spare = iter(free_ports(sum(h.local for h in hosts)))
    return [[f"{'127.0.0.1' if h.local else h.ip}:{next(spare) if h.local else base_port + r}"] for r, h in enumerate(hosts)]
