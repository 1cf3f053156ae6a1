"""Rolling acceptance estimates per content class and draft position, and what they imply.

rates[j] estimates P(draft j+1 accepted | drafts 1..j accepted). Counts decay, so old evidence
fades. A request starts from the shared prior with the weight of a few observations, so it adapts
within a few steps; everything it observes also updates the prior for later requests.
"""

from __future__ import annotations

import numpy as np

from policies.classifier import CLASSES


def expected_tokens(rates) -> float:
    """Tokens per speculative step with k = len(rates): 1 + sum_j prod_{i<=j} a_i."""
    return 1.0 + float(np.cumprod(rates).sum()) if len(rates) else 1.0


def observed(drafted: int, accepted: int) -> tuple[np.ndarray, np.ndarray]:
    """Which positions were tried and which accepted: positions 1..accepted passed, the next
    (if drafted) failed, later ones were never judged."""
    tried = np.arange(drafted) < min(drafted, accepted + 1)
    passed = np.arange(drafted) < accepted
    return tried, passed


def drafter_prior(k_max: int, rate: float = 0.5) -> np.ndarray:
    """Before any evidence, MTP draft position j (from 1) is accepted with rate**j given the drafts
    before it accepted (all of positions 1..j with rate**(j(j+1)/2)): deeper drafts cost a verified
    row each, so they must earn their place (exploration tries them now and then)."""
    return rate ** np.arange(1, k_max + 1)


def lookup_prior(k_max: int, first: float = 0.6, then: float = 0.8) -> np.ndarray:
    """Lookup copies: a copied continuation that starts right tends to go on being right."""
    return np.array([first] + [then] * (k_max - 1))


LOOKUP_MATCHES = (2, 3, 4)
LOOKUP_SOURCES = {"context": "", "phrases": "p"}  # the key's prefix per source


def lookup_key(cls: str, match: int, source: str = "context") -> str:
    """Lookup estimates are kept per content class, source and n-gram match length (longer:
    surer): `code/3` copies from the context after a 3-gram, `code/p3` from the phrasebook."""
    return f"{cls}/{LOOKUP_SOURCES[source]}{min(max(match, LOOKUP_MATCHES[0]), LOOKUP_MATCHES[-1])}"


LOOKUP_KEYS = tuple(lookup_key(c, m, s) for c in CLASSES for s in LOOKUP_SOURCES for m in LOOKUP_MATCHES)


class AcceptanceCounts:
    def __init__(self, k_max: int, decay: float = 0.995, prior: np.ndarray | None = None, weight: float = 2.0,
                 keys: tuple[str, ...] = CLASSES):
        """prior[j]: the acceptance rate of position j + 1 before any evidence, worth `weight`
        observations (default: drafter_prior)."""
        self.k_max, self.decay, self.keys = k_max, decay, keys
        start = drafter_prior(k_max) if prior is None else prior
        self.hits = {c: start * weight for c in keys}
        self.trials = {c: np.full(k_max, weight) for c in keys}

    def rates(self, cls: str) -> np.ndarray:
        return self.hits[cls] / self.trials[cls]

    def observe(self, cls: str, drafted: int, accepted: int) -> None:
        tried, passed = observed(drafted, accepted)
        tried = np.pad(tried, (0, self.k_max - drafted))
        passed = np.pad(passed, (0, self.k_max - drafted))
        self.hits[cls] = np.where(tried, self.decay * self.hits[cls] + passed, self.hits[cls])
        self.trials[cls] = np.where(tried, self.decay * self.trials[cls] + 1, self.trials[cls])

    def to_dict(self) -> dict:
        return {c: {"hits": self.hits[c].tolist(), "trials": self.trials[c].tolist()} for c in self.keys}

    def load_dict(self, data: dict) -> None:
        for c in self.keys:
            if c in data and len(data[c]["hits"]) == self.k_max:
                self.hits[c], self.trials[c] = np.array(data[c]["hits"]), np.array(data[c]["trials"])


class RequestAcceptance(AcceptanceCounts):
    """One request's view: the prior's rates with `weight` pseudo-observations, a faster decay,
    and every observation passed on to the prior."""

    def __init__(self, prior: AcceptanceCounts, weight: float = 8.0, decay: float = 0.95):
        super().__init__(prior.k_max, decay, keys=prior.keys)
        self.prior = prior
        self.weight = weight
        for c in prior.keys:
            self.hits[c] = prior.rates(c) * weight
            self.trials[c] = np.full(prior.k_max, weight)

    def observe(self, cls: str, drafted: int, accepted: int) -> None:
        super().observe(cls, drafted, accepted)
        self.prior.observe(cls, drafted, accepted)

    def relax(self, cls: str, keep: float = 0.9) -> None:
        """A step without evidence (speculation off): the request's estimate drifts back toward the
        prior's, so a few early rejections do not keep speculation off for a whole long answer."""
        self.hits[cls] = keep * self.hits[cls] + (1 - keep) * self.weight * self.prior.rates(cls)
        self.trials[cls] = keep * self.trials[cls] + (1 - keep) * self.weight
