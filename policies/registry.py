"""Draft policies by name, as given to `--spec` and the API's `speculation` field."""

from __future__ import annotations

from policies.adaptive import AdaptivePolicy, SharedEstimates
from policies.fixed import Fixed

MAX_DRAFT = 16
NAMES = "off, fixed:K, adaptive or adaptive:mtp"


ADAPTIVE = ("adaptive", "adaptive:mtp")


def check(spec: str) -> None:
    """Raises ValueError for a name make_policy would refuse (the adaptive ones need no estimates here)."""
    if spec not in ADAPTIVE:
        make_policy(spec)


def make_policy(spec: str, shared: SharedEstimates | None = None):
    """`off`, `fixed:K` (1 <= K <= 16; the MTP drafter), `adaptive` (MTP drafter and lookup copies)
    or `adaptive:mtp` (the MTP drafter alone); the adaptive ones need the shared estimates."""
    if spec == "off":
        return Fixed(0)
    if spec in ADAPTIVE:
        if shared is None:
            raise ValueError("the adaptive policy needs calibrated estimates (a drafter)")
        return AdaptivePolicy(shared, lookup=spec == "adaptive")
    if spec.startswith("fixed:"):
        try:
            k = int(spec.removeprefix("fixed:"))
        except ValueError:
            k = -1
        if 1 <= k <= MAX_DRAFT:
            return Fixed(k)
        raise ValueError(f"bad draft policy {spec!r}: K in fixed:K must be an integer from 1 to {MAX_DRAFT}")
    raise ValueError(f"unknown draft policy {spec!r}: use {NAMES}")
