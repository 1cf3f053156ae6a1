"""Calibrating the adaptive policy on this machine: a short probe of step costs at start-up,
persisted per (model, drafter, machine) so a restarted daemon starts calibrated."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import platform
import time
from pathlib import Path

import mlx.core as mx
import structlog
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from daemon.cpu.blas import blas_in_use
from daemon.engine.batch import run_rows
from daemon.engine.ragged import batchable
from daemon.engine.rows import Forward
from daemon.models.block import is_block
from daemon.models.loading import LoadedModel, backend
from daemon.models.mtp import mtp_layers, offer_arrays
from policies.adaptive import K_MAX, SharedEstimates
from policies.cost import RowCosts, StepCosts

PROBE_CONTEXT = 64
PROBE_REPEATS = 7
PROBE_SECONDS = 0.5  # a measurement's time: slow forwards (a big model, a cluster's) are timed fewer times
ROW_PROBES = (16, 32)  # row counts a batch's forward is probed at past the single-sequence probe
BATCH_PROBE = 4  # sequences of the probe of what each sequence adds to a batch's forward
COST_FORMS = 8  # bump when forward passes change speed (2: column-major weights, FastBlock; 3: row-major copies;
# 4: the start-up probe keeps column-major weights only where they win; 5: few-row products; 6: to 12 rows;
# 7: attention in C; 8: few-row products to 24 rows, weights fetched ahead): re-probe


def machine() -> str:
    return f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, {backend()}, {blas_in_use()}"


def estimates_path(lm: LoadedModel, root: Path, verify_penalty: float = 0.0) -> Path:
    key = f"{lm.path}|{lm.drafter_name}|{machine()}|{verify_penalty}|{COST_FORMS}" + (f"|{lm.placement}" if lm.placement else "")
    return root / "calibration" / (hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")


def _fastest_seconds(run, repeats: int = PROBE_REPEATS) -> float:
    """The fastest of `repeats` runs, or of fewer (two at least) once they have taken PROBE_SECONDS:
    timing noise (other processes, page faults) only adds."""
    times = []
    while len(times) < repeats and (len(times) < 2 or sum(times) < PROBE_SECONDS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def probe_costs(lm: LoadedModel, k_max: int = K_MAX, verify_penalty: float = 0.0) -> StepCosts:
    """Times a target forward over n = 1 .. k_max + 1 positions and one drafter step.
    `verify_penalty`: seconds counted on top for each row past the first (daemon.engine.generate)."""
    model, drafter = lm.model, mtp_layers(lm.drafter)[0]  # the layer that drafts every round
    if is_block(drafter):  # no more drafts than its block proposes
        k_max = min(k_max, drafter.config.proposals)
    cache = make_prompt_cache(model)
    context = mx.array([[(i * 37) % 1000 + 10 for i in range(PROBE_CONTEXT)]])
    mx.eval(model(context, cache=cache))

    def verify(n):
        mx.eval(model(mx.full((1, n), 11), cache=cache))
        trim_prompt_cache(cache, n)

    verify(k_max + 1)  # warm-up
    measured = [_fastest_seconds(lambda n=n: verify(n)) + verify_penalty * (n - 1) for n in range(1, k_max + 2)]
    # more rows never cost less: a slow outlier at n is capped by what any larger n took
    t_verify = list(itertools.accumulate(reversed(measured), min))[::-1]
    hidden = mx.zeros((1, PROBE_CONTEXT, drafter.config.width))
    if is_block(drafter):
        return StepCosts(_block_seconds(drafter, model, hidden), t_verify, block=True)
    dcache = drafter.make_cache()
    # a drafter that reads offers gets one everywhere
    mx.eval(drafter.draft(hidden, context, dcache, model, offer_arrays(drafter, [(11, 2)] * PROBE_CONTEXT))[0])
    one_offer = offer_arrays(drafter, [(11, 2)])

    def draft():
        mx.eval(drafter.draft(hidden[:, :1], context[:, :1], dcache, model, one_offer)[0])
        trim_prompt_cache([dcache], 1)

    draft()
    return StepCosts(_fastest_seconds(draft), t_verify)


def _block_seconds(drafter, model, hidden: mx.array) -> float:
    """One block forward after a context of PROBE_CONTEXT positions: one position read, the block run."""
    caches = drafter.make_cache()
    mx.eval(drafter.read(hidden[:, 1:], caches))
    block = mx.array([[11] * drafter.config.block_size])

    def draft():
        mx.eval(drafter.draft(hidden[:, :1], block, caches, model)[0])
        trim_prompt_cache(caches, 1)

    draft()
    return _fastest_seconds(draft)


def shared_estimates(lm: LoadedModel, root: Path | None, verify_penalty: float = 0.0) -> SharedEstimates | None:
    """The saved estimates for this model, drafter and machine under `root` (the settings'
    cache_dir), or a fresh probe, then saved there (root None: kept in memory only); an unreadable
    file is probed again, and what a killed save left is removed. None without a drafter."""
    if lm.drafter is None:
        return None
    log = structlog.get_logger()
    path = estimates_path(lm, root, verify_penalty) if root is not None else None
    shared = None
    if path is not None:
        for tmp in path.parent.glob(f"{path.stem}.*.tmp"):  # a save that was killed
            with contextlib.suppress(OSError):
                tmp.unlink()
        shared = SharedEstimates.load(path)
        if shared is None and path.exists():
            log.warning("calibration unreadable: probed again", file=str(path))
    probed = shared is None or shared.rows is None
    if shared is None:
        shared = SharedEstimates(probe_costs(lm, verify_penalty=verify_penalty), path=path)
    if shared.rows is None:
        shared.rows = probe_rows(lm, shared.costs)
    if probed:
        shared.save()
    log.info("calibration probed" if probed else "calibration loaded", file=str(path))
    return shared


def probe_rows(lm: LoadedModel, costs: StepCosts) -> RowCosts:
    """A batch's forward time: the single-sequence probe's 1 .. k_max + 1 rows, then ROW_PROBES more
    rows in one sequence, and BATCH_PROBE sequences of one row each against one sequence of as many
    rows (what each sequence adds), all run as a batch runs them (daemon.engine.batch.run_rows)."""
    model, ragged = lm.model, batchable(lm.model)
    caches = [make_prompt_cache(model) for _ in range(BATCH_PROBE)]
    for c in caches:
        mx.eval(model(mx.array([[(i * 37) % 1000 + 10 for i in range(PROBE_CONTEXT)]]), cache=c))

    def forward(rows: list[int]):
        forwards = [Forward([11] * n, c) for n, c in zip(rows, caches)]
        mx.eval([r.logits for r in run_rows(model, forwards, ragged)])
        for f in forwards:
            trim_prompt_cache(f.cache, len(f.tokens))

    forward([ROW_PROBES[-1]])  # warm-up
    more = [_fastest_seconds(lambda n=n: forward([n]), repeats=3) for n in ROW_PROBES]
    one = _fastest_seconds(lambda: forward([BATCH_PROBE]))
    several = _fastest_seconds(lambda: forward([1] * BATCH_PROBE))
    rows = list(range(1, costs.k_max + 2)) + list(ROW_PROBES)
    seconds = list(itertools.accumulate([*costs.t_verify, *more], max))  # more rows never cost less
    return RowCosts(rows, seconds, max(several - one, 0.0) / (BATCH_PROBE - 1))
