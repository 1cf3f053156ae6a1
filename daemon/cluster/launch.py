"""Starting a group and keeping an eye on it: rank 0 (this process) starts the other ranks (a local
process on loopback, `ssh HOST` elsewhere, as mlx.launch does), joins MLX's ring backend with them,
checks they loaded the same model and drafter, and takes its share of the layers. A rank that exits
or whose connection drops is a `RankLost`: rank 0 fails what is running with it and stops; the
others stop when rank 0's connections close.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import mlx.core as mx
import mlx.nn as nn
import structlog

from daemon.cluster.faults import RankLost
from daemon.cluster.hosts import Host, parse_hosts, read_hostfile, ring_addresses
from daemon.cluster.identity import fingerprint, verify
from daemon.cluster.split import check, nbytes, split_follower, split_rank0
from daemon.cluster.stage import Follower, Link
from daemon.cpu.blas import THREAD_VARS, set_threads
from daemon.models.loading import settle
from daemon.models.target import target_head_layer, trunk

log = structlog.get_logger()
POLL_SECONDS = 0.2
QUIT_SECONDS = 5.0  # the other ranks' time to stop once told


def join_ring(ring: list[list[str]], rank: int):
    """This process's place in the ring backend's group (blocks until every rank is there)."""
    fd, hostfile = tempfile.mkstemp(prefix="mtpd-ring-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(ring, f)
    os.environ.update(MLX_HOSTFILE=hostfile, MLX_RANK=str(rank))
    try:
        return mx.distributed.init(backend="ring", strict=True)
    finally:
        os.unlink(hostfile)


def _layout(group, start: int, end: int, held: int) -> list[list[int]]:
    """Every rank's [start, end, MiB of weights held, MiB of memory at its peak], gathered on every rank."""
    mine = mx.array([start, end, held >> 20, mx.get_peak_memory() >> 20], dtype=mx.int32)
    return mx.distributed.all_gather(mine, group=group).reshape(group.size(), 4).tolist()


class Cluster:
    """Rank 0's view of the group: the other ranks' processes, the link, a watchdog."""

    def __init__(self, hosts: list[Host], split: str, model: str | None, drafter: str | None, base_port: int):
        self.hosts, self.split, self.model, self.drafter = hosts, split, model, drafter
        self.ring = ring_addresses(hosts, base_port)
        self.processes: dict[int, subprocess.Popen] = {}
        self.link: Link | None = None
        self.lost: RankLost | None = None
        self.on_lost: Callable[[RankLost], None] = self._abort  # until someone can fail requests with it
        self._closing = False

    @classmethod
    def of(cls, settings) -> Cluster | None:
        """The cluster the settings ask for (hosts or hostfile), its ranks started; None for one process."""
        if settings.hosts is None and settings.hostfile is None:
            return None
        hosts = read_hostfile(settings.hostfile) if settings.hostfile is not None else parse_hosts(settings.hosts)
        cluster = cls(hosts, settings.split, settings.model, settings.drafter, settings.cluster_port)
        cluster.spawn()
        return cluster

    @property
    def size(self) -> int:
        return len(self.hosts)

    def describe(self) -> str:
        return f"{self.split} over {self.size} ranks ({', '.join(h.ssh for h in self.hosts)})"

    def spawn(self) -> None:
        """Starts ranks 1 .. size-1, which load the model while this process does. Ranks on this
        machine share its cores: each gets its share of BLAS threads."""
        local = sum(h.local for h in self.hosts)
        threads = str(max(1, (os.cpu_count() or 1) // local))
        if local > 1:
            set_threads(int(threads))
        for rank, host in enumerate(self.hosts[1:], 1):
            argv = [sys.executable, "-m", "daemon", "rank", "--rank", str(rank), "--split", self.split,
                    "--ring", json.dumps(self.ring)]
            argv += [a for flag, v in (("--model", self.model), ("--drafter", self.drafter)) if v is not None for a in (flag, v)]
            if not host.local:
                argv = ["ssh", host.ssh, f"cd {shlex.quote(os.getcwd())} && {shlex.join(argv)}"]
            env = {**os.environ, **({name: threads for name in THREAD_VARS} if host.local else {})}
            self.processes[rank] = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=env)
            log.info("rank started", rank=rank, host=host.ssh, pid=self.processes[rank].pid)
        threading.Thread(target=self._watch, name="mtpd-ranks", daemon=True).start()

    def join(self, lm) -> None:
        """Joins the group, checks every rank loaded the same, and takes rank 0's share of `lm`'s layers."""
        check(lm.model, self.split, self.size)
        group = join_ring(self.ring, 0)
        verify(group, fingerprint(self.model, self.drafter, self.split, self.size), [h.ssh for h in self.hosts])
        self.link = Link(group, self.split)
        start, end = split_rank0(lm.model, self.link)
        layers = trunk(lm.model).layers
        settle(lm.model, layers[start:end], target_head_layer(lm.model), fast_blocks=self.split == "pipeline")
        for rank, (first, stop, mib, peak) in enumerate(_layout(group, start, end, nbytes([lm.model]))):
            log.info("rank ready", rank=rank, host=self.hosts[rank].ssh, split=self.split, layers=f"{first}-{stop - 1}",
                     weights_mib=mib, peak_memory_mib=peak)
        lm.placement = self.describe()

    def fault(self, error: BaseException) -> RankLost | None:
        """`error` as a RankLost if the group caused it (a rank gone, a connection dropped), else None."""
        if isinstance(error, RankLost):
            return error
        if self._closing or not (isinstance(error, RuntimeError) and "[ring]" in str(error)):
            return None
        deadline = time.monotonic() + 1.0  # the process of a dropped connection is usually gone by then
        while self.lost is None and time.monotonic() < deadline:
            self._check_processes()
            time.sleep(POLL_SECONDS)
        return self.lost or RankLost(f"the connection to a rank was lost ({error}); mtpd stops so that the group restarts")

    def close(self) -> None:
        """Tells the other ranks to stop, waits a little, ends what is left."""
        if self._closing:
            return
        self._closing = True
        if self.link is not None and self.lost is None:
            try:
                self.link.close()
            except RuntimeError:
                pass
        deadline = time.monotonic() + QUIT_SECONDS
        for p in self.processes.values():
            try:
                p.wait(max(deadline - time.monotonic(), 0.1) if self.lost is None else 0.1)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def _check_processes(self) -> None:
        for rank, p in self.processes.items():
            code = p.poll()
            if code is not None and self.lost is None:
                self.lost = RankLost(f"rank {rank} on {self.hosts[rank].ssh} exited (code {code}); "
                                     "mtpd stops so that its service manager restarts the group")

    def _watch(self) -> None:
        while not self._closing and self.lost is None:
            self._check_processes()
            time.sleep(POLL_SECONDS)
        if self.lost is not None and not self._closing:
            log.error("rank lost", error=str(self.lost))
            self.on_lost(self.lost)

    def _abort(self, lost: RankLost) -> None:
        """Before serving (start-up): nothing to answer, so stop now rather than wait in a collective."""
        self.close()
        print(f"mtpd: error: {lost}", file=sys.stderr, flush=True)
        os._exit(1)


def follow(rank: int, split: str, ring: list[list[str]], model: str | None, drafter: str | None) -> None:
    """Rank `rank` (not 0): load, join, check, keep this rank's share, run forwards until told to stop."""
    from daemon.models.loading import load

    threading.Thread(target=_orphaned, args=(os.getppid(),), daemon=True).start()
    lm = load(model, drafter="none", lazy=True)
    check(lm.model, split, len(ring))
    group = join_ring(ring, rank)
    hosts = [r[0] for r in ring]
    verify(group, fingerprint(model, drafter, split, len(ring)), hosts)
    layers, start, end = split_follower(lm.model, group, split)
    del lm  # what this rank does not run, never read
    settle(nn.Sequential(*layers), layers, fast_blocks=split == "pipeline")
    _layout(group, start, end, nbytes(layers))  # rank 0 logs every rank's
    Follower(group, layers, split, start).serve()
    log.info("rank stopped", rank=rank)


def _orphaned(parent: int) -> None:
    """Ends this rank if the process that started it is gone (before the ring connects, nothing else would)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)
