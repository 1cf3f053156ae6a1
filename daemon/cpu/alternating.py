"""Timing two ways of one computation against each other, for the start-up probes."""

from __future__ import annotations

import time
from collections.abc import Callable


def fastest(first: tuple[str, Callable[[], None]], second: tuple[str, Callable[[], None]]) -> dict[str, float]:
    """Seconds of each way's fastest run, visiting them A B B A A B so drift cancels; each way's
    first visit warms it up (traces, kernels built, first touches) and is not counted."""
    ways = dict((first, second))
    a, b = ways
    times: dict[str, list[float]] = {a: [], b: []}
    for name in (a, b, b, a, a, b):
        start = time.perf_counter()
        ways[name]()
        times[name].append(time.perf_counter() - start)
    return {name: min(t[1:]) for name, t in times.items()}
