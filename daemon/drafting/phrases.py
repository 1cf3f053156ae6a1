"""The target's phrasebook: what the target model itself tends to write next, as a static n-gram
table built from its own greedy answers when its drafter is trained, and shipped with the drafter.

Where the context lookup (daemon.drafting.lookup) has nothing to copy, the phrasebook offers the target's
habitual continuation: the boilerplate of its code (`if __name__ == "__main__":`, fences, the
opening of a docstring), of its explanations and of its worked answers. Each offered token is the
one that most often followed the longest n-gram (n_max down to n_min) the text ends with, kept only
where it followed at least `min_count` times and won at least `min_share` of them; an offer chains
such tokens. Like a context copy it costs no model work, and the adaptive policy keeps separate
acceptance estimates for it, so a phrasebook that does not fit the content is simply not used.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from policies.plan import NO_OFFER, Proposal

FILE = "phrases.npz"


class Phrasebook:
    def __init__(self, table: dict[tuple[int, ...], int], n_min: int, n_max: int):
        self.table, self.n_min, self.n_max = table, n_min, n_max

    @classmethod
    def build(cls, sequences: Iterable[Sequence[int]], n_min: int = 2, n_max: int = 4, min_count: int = 2,
              min_share: float = 0.5) -> Phrasebook:
        counts: dict[tuple[int, ...], Counter] = defaultdict(Counter)
        for seq in sequences:
            seq = list(seq)
            for end in range(n_min, len(seq)):
                for n in range(n_min, min(n_max, end) + 1):
                    counts[tuple(seq[end - n : end])][seq[end]] += 1
        table = {}
        for context, after in counts.items():
            token, count = after.most_common(1)[0]
            if count >= min_count and count >= min_share * after.total():
                table[context] = token
        return cls(table, n_min, n_max)

    def propose(self, tokens: Sequence[int], k: int) -> Proposal:
        """Up to k tokens continuing `tokens`, chained through the table; match: the n-gram length
        behind the first one."""
        text, out, match = list(tokens[-self.n_max :]), [], 0
        while len(out) < k:
            for n in range(min(self.n_max, len(text)), self.n_min - 1, -1):
                token = self.table.get(tuple(text[-n:]))
                if token is not None:
                    break
            else:
                break
            match = match or n
            out.append(token)
            text.append(token)
        return Proposal(tuple(out), match, "phrases") if out else NO_OFFER

    def save(self, folder: str | Path) -> None:
        arrays = {"n_min": np.array(self.n_min), "n_max": np.array(self.n_max)}
        for n in range(self.n_min, self.n_max + 1):
            rows = [(*context, token) for context, token in self.table.items() if len(context) == n]
            arrays[f"gram{n}"] = np.array(rows, np.int32).reshape(-1, n + 1)
        tmp = Path(folder) / "phrases.tmp.npz"
        np.savez_compressed(tmp, **arrays)
        tmp.replace(Path(folder) / FILE)

    @classmethod
    def load(cls, folder: str | Path) -> Phrasebook | None:
        """The phrasebook shipped in a drafter folder, or None when it has none."""
        path = Path(folder) / FILE
        if not path.is_file():
            return None
        with np.load(path) as data:
            n_min, n_max = int(data["n_min"]), int(data["n_max"])
            table = {tuple(row[:-1]): row[-1] for n in range(n_min, n_max + 1) for row in data[f"gram{n}"].tolist()}
        return cls(table, n_min, n_max)

    def __len__(self) -> int:
        return len(self.table)
