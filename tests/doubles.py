"""Test drafters that follow the MTP drafter's interface but choose their proposals by rule."""

from __future__ import annotations

from types import SimpleNamespace

import mlx.core as mx


class TrimmableOffset:
    """A drafter cache that only tracks positions (what trim_prompt_cache needs)."""

    def __init__(self, sequence=()):
        self.offset = 0
        self.sequence = list(sequence)  # what a RuleDrafter has seen on this cache

    def is_trimmable(self):
        return True

    def trim(self, n):
        n = min(self.offset, n)
        self.offset -= n
        return n


class RuleDrafter:
    """Sees the same (hidden, next token) pairs as an MTP drafter and knows the sequence so far (on
    each sequence's own cache, so sequences can run batched); `rule(prefix) -> logits [V]` decides
    what it proposes after `prefix`."""

    def __init__(self, first_token: int, rule, hidden_size: int):
        self.config = SimpleNamespace(source="post_norm", reads_offers=False, width=hidden_size)
        self.first_token = first_token
        self.rule = rule
        self.hidden_size = hidden_size

    def make_cache(self):
        return TrimmableOffset([self.first_token])

    def chained(self, own, hidden):
        return own

    def draft(self, hidden, tokens, cache, target, offers=None):
        """The MTP drafter's draft(): the pairs fill the sequence, the rule runs on the last
        position alone. Returns (logits [1, V], block output [1, L, H]). Like the MTP drafter's
        concatenation it needs one hidden row per token."""
        assert hidden.shape[:2] == tokens.shape, (hidden.shape, tokens.shape)
        del cache.sequence[cache.offset + 1 :]  # forget trimmed positions
        cache.sequence.extend(tokens[0].tolist())
        cache.offset += tokens.shape[1]
        return self.rule(list(cache.sequence))[None], mx.zeros((1, tokens.shape[1], self.hidden_size))


def target_logits(model):
    """The rule that proposes exactly what the target predicts (q = p)."""

    def rule(prefix):
        return model(mx.array([prefix]))[0, -1]

    return rule


def planted_errors(model, wrong_at, vocab: int):
    """Target's argmax, except at sequence lengths in `wrong_at`, where it proposes another token."""

    def rule(prefix):
        logits = model(mx.array([prefix]))[0, -1]
        best = mx.argmax(logits).item()
        choice = (best + 1) % vocab if len(prefix) in wrong_at else best
        return mx.where(mx.arange(vocab) == choice, 10.0, -10.0)

    return rule


def known_sequence(sequence, vocab: int):
    """Proposes the next token of a known sequence (no model call: a drafter that costs nothing)."""
    table = mx.eye(vocab) * 20 - 10

    def rule(prefix):
        return table[sequence[len(prefix)] if len(prefix) < len(sequence) else 0]

    return rule


def speculated_cache(model, drafter, prompt, k: int, n: int):
    """Runs fixed:k speculation with `drafter` for about n tokens, greedy. Returns (the target's
    cache, the token ids it holds: the prompt and all emitted but the last)."""
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.drafting.lookup import NgramIndex
    from daemon.drafting.session import DraftingSession
    from daemon.engine.choose import TokenChooser
    from daemon.engine.forward import hidden_tap, prefill_rows
    from daemon.engine.plain import Decoding
    from daemon.engine.rows import alone, drain
    from daemon.engine.sampling import SamplingParams, new_key
    from daemon.engine.speculative import speculative_steps
    from daemon.engine.ties import NearTieGuard
    from policies.fixed import Fixed

    cache = make_prompt_cache(model)
    tap = hidden_tap(model)
    logits, chunks = drain(model, prefill_rows(cache, prompt, tap, "post_norm"))
    index = NgramIndex()
    index.extend(prompt)
    dec = Decoding(model, cache, TokenChooser(SamplingParams(), new_key(0), NearTieGuard(model, 2e-3)), logits.shape[-1])
    session = DraftingSession(drafter, model, index)
    emitted = []
    for step in alone(model, speculative_steps(dec, session, tap, Fixed(k), lambda: "prose", n + 10, logits,
                                               mx.concatenate(chunks, axis=1))):
        emitted.extend(step.tokens)
        if len(emitted) >= n:
            break
    return cache, list(prompt) + emitted[:-1]  # the last token is not in the cache yet


def small_vocab(tokenizer, vocab: int, fast: bool = False):
    """A one-block llama target over `vocab` tokens with sharp distributions (weights x3), whose
    exact joint distributions are cheap to enumerate. `fast`: its block a FastBlock, as loading
    makes them (so sequences batch in one forward)."""
    from mlx.utils import tree_map
    from mlx_lm.models import llama

    from daemon.cpu import fast_block
    from daemon.models.loading import LoadedModel

    mx.random.seed(3)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64, num_attention_heads=2,
        num_key_value_heads=1, rms_norm_eps=1e-5, vocab_size=vocab, rope_traditional=True, tie_word_embeddings=False,
    )
    model = llama.Model(args)
    model.update(tree_map(lambda p: p * 3, model.parameters()))
    mx.eval(model.parameters())
    if fast:
        fast_block.install(model.layers)
    return LoadedModel(model, tokenizer, "small-vocab", "", False, {"vocab_size": vocab})
