"""Draft policies by name, as given to `--spec` and the API's `speculation` field."""

from __future__ import annotations

from policies.adaptive import AdaptivePolicy, SharedEstimates
from policies.fixed import Fixed

MAX_DRAFT = 16
NAMES = "off, fixed:K or adaptive"


def make_policy(spec: str, shared: SharedEstimates | None = None):
    """`off`, `fixed:K` (1 <= K <= 16) or `adaptive` (needs the shared estimates)."""
    if spec == "off":
        return Fixed(0)
    if spec == "adaptive":
        if shared is None:
            raise ValueError("the adaptive policy needs calibrated estimates (a drafter)")
        return AdaptivePolicy(shared)
    if spec.startswith("fixed:"):
        try:
            k = int(spec.removeprefix("fixed:"))
        except ValueError:
            k = -1
        if 1 <= k <= MAX_DRAFT:
            return Fixed(k)
        raise ValueError(f"bad draft policy {spec!r}: K in fixed:K must be an integer from 1 to {MAX_DRAFT}")
    raise ValueError(f"unknown draft policy {spec!r}: use {NAMES}")
