"""Continuous batching: sequences stepped together give each the answer it gets alone (greedy to
the token, sampling in distribution), drafts are fitted to the batch's rows, and a short request
is answered while a long one runs."""

import dataclasses
import itertools
import threading
import time

import mlx.core as mx
import numpy as np
import pytest
from doubles import RuleDrafter, small_vocab, target_logits
from mlx_lm.models.cache import make_prompt_cache
from test_speculative import VOCAB, chi2_critical, exact_joint

from daemon.drafting.lookup import NgramIndex
from daemon.drafting.session import DraftingSession
from daemon.engine.batch import Batch
from daemon.engine.forward import hidden_tap
from daemon.engine.generate import generate, sequence
from daemon.engine.ragged import run_drafts
from daemon.engine.records import Delta, Finished, Request
from daemon.engine.rows import drain
from daemon.engine.sampling import SamplingParams
from daemon.server.loaded import Loaded
from daemon.server.worker import Job, Limits, Worker
from policies.adaptive import AdaptivePolicy, SharedEstimates
from policies.batch import Clock, draft_units, fit_drafts, shares
from policies.cost import CELL_SEEN, RowCosts, StepCosts
from policies.fixed import Fixed
from policies.plan import NO_OFFER, Proposal

PROMPTS = [(1, 80, 120, 7, 200, 33, 150), (5, 9, 5, 9, 5, 9, 5, 9, 5), (3,) * 40, tuple(range(10, 110))]


# --- the fit: drafts cut where their rows cost more than they bring ---------------------------

def test_fit_keeps_every_draft_when_rows_are_free():
    plans = [(3, (0.9, 0.8, 0.7)), (2, (0.3, 0.2)), (4, ())]
    assert fit_drafts(plans, 3, lambda rows: 0.1, 0.0, 64) == [3, 2, 4]


def test_fit_drops_the_least_likely_drafts_first_when_rows_are_dear():
    # a step of 3 rows brings 3 tokens in 0.13 s; a row adds 0.01 s, so it pays above ~0.23 tokens
    plans = [(3, (0.95, 0.9, 0.9)), (3, (0.2, 0.5, 0.5)), (2, (0.6, 0.1))]
    assert fit_drafts(plans, 3, lambda rows: 0.1 + 0.01 * rows, 0.0, 64) == [3, 0, 1]
    # when every row costs as much as a whole step, no draft brings a row's worth
    assert fit_drafts(plans, 3, lambda rows: 0.01 * rows, 0.0, 64) == [0, 0, 0]


def test_fit_drops_drafts_that_do_not_beat_plain_by_the_margin():
    # free rows, but two drafts of 5% bring 5% more tokens: under the margin, so none are kept
    assert fit_drafts([(1, (0.05,)), (1, (0.05,))], 2, lambda rows: 0.1, 0.0, 64) == [0, 0]
    assert fit_drafts([(1, (0.5,)), (1, (0.5,))], 2, lambda rows: 0.1, 0.0, 64) == [1, 1]


def verdicts(clock: Clock, sequences: int, steps: int) -> list[bool]:
    return [clock.drafts_pay(sequences) for _ in range(steps)]


def test_the_clock_drops_drafts_where_drafting_steps_ran_slower_and_keeps_checking():
    clock = Clock()
    assert verdicts(clock, 8, 16) == [i % Clock.EXPLORE != Clock.EXPLORE - 1 for i in range(16)]  # unmeasured: priced
    for _ in range(Clock.MIN_STEPS):
        clock.observe(8, True, 10, 0.1)  # 100 tok/s drafting
        clock.observe(8, False, 8, 0.07)  # ~114 tok/s plain
        clock.observe(4, True, 6, 0.05)  # 120 tok/s drafting
        clock.observe(4, False, 4, 0.04)  # 100 tok/s plain
    assert verdicts(clock, 8, 16) == [i % Clock.EXPLORE == Clock.EXPLORE - 1 for i in range(16)]  # explores
    assert verdicts(clock, 4, 8)[:7] == [True] * 7
    for _ in range(40):  # drafting gets faster at 8: drafts come back
        clock.observe(8, True, 14, 0.1)
    assert verdicts(clock, 8, 7) == [True] * 7


def test_fit_cuts_to_the_row_limit_estimated_drafts_before_fixed_ones():
    plans = [(4, ()), (4, (0.9, 0.9, 0.9, 0.9)), (4, (0.5, 0.5, 0.5, 0.5))]
    ks = fit_drafts(plans, 3, lambda rows: 0.1, 0.0, 9)
    assert sum(ks) == 6 and ks[0] == 4 and ks[1] >= ks[2]


def test_copied_drafts_cost_their_rows_but_no_drafter_forward():
    plans = [(2, [0.5, 0.5]), (2, [0.5, 0.5])]
    dear_drafter = dict(row_seconds=lambda rows: 0.1 + 0.001 * rows, draft_seconds=0.05, max_rows=64, together=True)
    assert fit_drafts(plans, 2, **dear_drafter) == [0, 0]
    assert fit_drafts(plans, 2, **dear_drafter, copies=[True, True]) == [2, 2]
    # one copies, one drafts: the drafter's forwards are priced for the one that drafts
    assert fit_drafts(plans, 2, **dear_drafter, copies=[True, False]) == [2, 0]


def test_drafts_that_run_together_cost_a_forward_per_position():
    assert draft_units([3, 1, 0, 2], together=False) == 9  # 6 drafts, 3 drafting sequences
    assert draft_units([3, 1, 0, 2], together=True) == 6  # 3 positions
    assert draft_units([0, 0], together=True) == 0
    assert draft_units([3, 1, 0, 2], together=False, block=True) == 6  # a block per sequence, whatever its k
    assert draft_units([3, 1, 0, 2], together=True, block=True) == 4  # one block forward for all
    assert draft_units([0, 0], together=True, block=True) == 0
    # together, a second sequence's first draft costs its row and its bookkeeping, not a forward:
    # with dear drafter forwards it is kept where one at a time it is not
    plans = [(1, (0.5,)), (1, (0.5,))]
    assert fit_drafts(plans, 2, lambda rows: 0.1, 0.01, 64, together=False) == [0, 0]
    assert fit_drafts(plans, 2, lambda rows: 0.1, 0.01, 64, together=True) == [1, 1]
    # what a verified round costs a sequence beyond its rows and drafts is priced too
    assert fit_drafts(plans, 2, lambda rows: 0.1, 0.0, 64, together=True, verify_seconds=0.02) == [0, 0]
    assert fit_drafts(plans, 2, lambda rows: 0.1, 0.0, 64, together=True, verify_seconds=0.005) == [1, 1]


def measured(per_row: float, per_sequence: float, sequences: int, *row_counts: int) -> RowCosts:
    """Row costs whose forwards of `sequences` took per_row a row plus per_sequence a sequence,
    at each of `row_counts` (CELL_SEEN times each)."""
    rows = RowCosts([1, 64], [0.02, 0.02 + 0.063 * 0.01], per_sequence=0.001)
    for r in row_counts:
        for _ in range(CELL_SEEN):
            rows.observe(r, sequences, per_row * r + per_sequence * sequences)
    return rows


def test_a_sequences_share_of_a_batch_step():
    mine = shares(measured(0.004, 0.006, 8, 8, 16), 8, 0.002, 0.0005, together=True, k_max=4)
    assert mine.explored and mine.predict(0) == pytest.approx((0.032 + 0.048) / 8)
    assert mine.row == pytest.approx(0.004) and mine.t_verify[3] - mine.t_verify[0] == pytest.approx(0.012)
    assert mine.predict(2) == pytest.approx(mine.predict(0) + 2 * 0.004 + 2 * 0.002 / 8 + 0.0025)
    assert mine.predict(2, lookup=True) == pytest.approx(mine.predict(0) + 2 * 0.004 + 0.0025)  # copies need no drafter
    apart = shares(measured(0.004, 0.006, 8, 8, 16), 8, 0.002, 0.0, together=False, k_max=4)  # a drafter forward each
    assert apart.predict(2) == pytest.approx(mine.predict(2) + 2 * 0.00175 - 0.0005)
    block = shares(measured(0.004, 0.006, 8, 8, 16), 8, 0.002, 0.0, together=False, k_max=4, block=True)
    assert block.predict(3) - block.predict(1) == pytest.approx(2 * 0.004)  # one drafter forward whatever k
    assert not shares(measured(0.004, 0.006, 8, 8), 8, 0.002, 0.0, together=True, k_max=4).explored  # 16 rows never ran


def test_in_a_batch_the_adaptive_policy_drafts_one_where_its_share_pays_and_explores_first():
    shared = SharedEstimates(StepCosts(0.003, [0.040 + 0.004 * n for n in range(9)]))
    for i in range(200):
        shared.acceptance.observe("code", 1, int(i % 5 < 3))  # 0.6 accepted
    offer = Proposal((5, 6, 7), match=3)
    assert AdaptivePolicy(shared).plan(NO_OFFER, "code").k > 0  # alone: its own step costs
    # 8 sequences whose second rows cost next to nothing: one draft each, from the drafter, with its rate
    shared.batch = shares(measured(0.0002, 0.010, 8, 8, 16), 8, 0.001, 0.0, together=True, k_max=8)
    plan = AdaptivePolicy(shared).plan(NO_OFFER, "code")
    assert (plan.k, plan.lookup, plan.rates) == (1, False, (pytest.approx(0.6, abs=0.01),))
    # a lookup's offer whose copies are accepted 0.6, then 0.8 (its prior): the whole offer is copied
    plan = AdaptivePolicy(shared).plan(offer, "code")
    assert (plan.k, plan.lookup) == (3, True) and plan.rates == pytest.approx((0.6, 0.8, 0.8))
    # copies that are seldom accepted: the drafter's draft
    for _ in range(200):
        shared.lookup.observe("code/3", 3, 0)
    plan = AdaptivePolicy(shared).plan(offer, "code")
    assert (plan.k, plan.lookup) == (1, False)
    # 4 sequences whose second rows cost a whole share each: none
    shared.batch = shares(measured(0.010, 0.001, 4, 4, 8), 4, 0.001, 0.0, together=True, k_max=8)
    assert AdaptivePolicy(shared).plan(offer, "code").k == 0
    # a batch whose every-sequence-drafts-one step has not run: one draft, rates unstated, so the batch runs it
    shared.batch = shares(measured(0.010, 0.001, 4, 4), 4, 0.001, 0.0, together=True, k_max=8)
    plan = AdaptivePolicy(shared).plan(NO_OFFER, "code")
    assert (plan.k, plan.rates) == (1, ())


def test_a_batch_remeasures_a_step_of_one_draft_each_now_and_then(tiny_lm):
    from daemon.engine.batch import REMEASURE

    shared = shared_estimates()
    shared.rows = measured(0.010, 0.001, 3, 3, 6)
    batch = Batch(tiny_lm.model, lambda owner, r: None, 64, shared.rows, 0.002, None, shared)
    batch.running = [None] * 3
    explored = [batch._shares().explored for _ in range(2 * REMEASURE)]
    assert explored.count(False) == 2 and not explored[REMEASURE - 1] and not explored[-1]


def test_a_batch_prices_its_sequences_steps_while_several_run(tiny_gguf):
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="random")
    shared, seen = shared_estimates(), []

    class Watching(Fixed):
        def plan(self, offer, content_class):
            seen.append(shared.batch)
            return super().plan(offer, content_class)

    batch = Batch(lm.model, lambda owner, r: None, 64, shared.rows, 0.002, lm.drafter, shared)
    for i, p in enumerate(PROMPTS[:2]):
        batch.add(i, sequence(lm, Request(p, max_tokens=4 + 20 * i), Watching(1), batched=True))
    while batch.running:
        batch.step()
    assert shared.batch is None  # the last one ran alone
    assert any(s is not None and s.share > 0 for s in seen) and seen[-1] is None


def test_row_costs_interpolate_extrapolate_and_learn():
    rows = RowCosts([1, 2, 4], [0.1, 0.12, 0.16], per_sequence=0.01)
    assert rows.predict(3, 1) == pytest.approx(0.14)
    assert rows.predict(8, 1) == pytest.approx(0.24)  # the last slope, 0.02 a row
    assert rows.predict(2, 3) == pytest.approx(0.14)
    for _ in range(200):
        rows.observe(2, 1, 0.24)
    assert rows.predict(2, 1) == pytest.approx(0.24, rel=0.01)
    assert RowCosts.from_dict(rows.to_dict()).predict(4, 2) == pytest.approx(rows.predict(4, 2))


def test_row_costs_follow_what_batched_forwards_of_as_many_sequences_and_rows_took():
    rows = RowCosts([1, 4, 8, 16], [0.03, 0.034, 0.055, 0.080], per_sequence=0.001)
    for t in [0.055] * 9 + [0.5] + [0.055] * 2:  # a stalled forward moves the running median 5%, no more
        rows.observe(4, 4, t)
    assert rows.predict(4, 4) == pytest.approx(0.055, rel=0.06)
    for _ in range(CELL_SEEN):
        rows.observe(8, 4, 0.089)
    assert rows.predict(8, 4) == pytest.approx(0.089)
    assert rows.predict(6, 4) == pytest.approx((rows.predict(4, 4) + 0.089) / 2)  # between two: the line
    beside = rows.predict(16, 4) - rows.predict(8, 4)  # past the last: the probe's slope, scaled
    assert beside == pytest.approx((0.080 - 0.055) * rows.scale)
    assert rows.predict(8, 8) == pytest.approx((0.055 + 0.007) * rows.scale)  # 8 sequences never ran: the probe
    rows.observe(16, 4, 0.095)  # seen fewer than CELL_SEEN times: not yet
    assert rows.predict(16, 4) == pytest.approx(0.089 + (0.080 - 0.055) * rows.scale)
    again = RowCosts.from_dict(rows.to_dict())
    assert [again.predict(r, 4) for r in (4, 6, 8, 16)] == pytest.approx([rows.predict(r, 4) for r in (4, 6, 8, 16)])


# --- lossless: each sequence's answer is its answer alone -------------------------------------

def run_batch(lm, requests, policies, max_rows=64, chunk=16, rows=None):
    """Every request in one batch; returns (each one's Finished, the step reports)."""
    records = {}
    batch = Batch(lm.model, lambda owner, record: records.setdefault(owner, []).append(record), max_rows, rows, 0.001,
                  lm.drafter)
    for i, (request, policy) in enumerate(zip(requests, policies)):
        batch.add(i, sequence(lm, request, policy, chunk=chunk, batched=True))
    reports = []
    while batch.running:
        if (report := batch.step()) is not None:
            reports.append(report)
    return [records[i][-1] for i in range(len(requests))], reports


def shared_estimates():
    return SharedEstimates(StepCosts(0.004, [0.07 + 0.008 * n for n in range(9)]),
                           rows=RowCosts([1, 2, 4, 8, 16], [0.07, 0.078, 0.094, 0.126, 0.19], 0.005))


@pytest.mark.parametrize("spec", ["off", "fixed:3", "adaptive"])
def test_batched_greedy_equals_alone(tiny_gguf, spec):
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="random")
    estimates = shared_estimates()

    def policy():
        return AdaptivePolicy(estimates) if spec == "adaptive" else Fixed(int(spec.partition(":")[2] or 0))

    requests = [Request(p, max_tokens=24 + 8 * i) for i, p in enumerate(PROMPTS)]
    alone = [list(generate(lm, r, policy()))[-1] for r in requests]
    batched, reports = run_batch(lm, requests, [policy() for _ in requests], rows=estimates.rows)
    assert [b.token_ids for b in batched] == [a.token_ids for a in alone]
    assert max(r.sequences for r in reports) == len(requests)  # they really shared forwards
    if spec == "fixed:3":
        assert sum(b.stats.drafted for b in batched) > 0 and any(r.drafted for r in reports)
        # the drafter's forwards ran together, and each sequence drafted what it drafts alone
        assert [b.stats.accepted_by_position for b in batched] == [a.stats.accepted_by_position for a in alone]


def started_sessions(lm, prompts):
    """A drafting session for each prompt, the prompt read by the target and the drafter."""
    source, sessions = lm.drafter.config.source, []
    for prompt in prompts:
        cache, tap = make_prompt_cache(lm.model), hidden_tap(lm.model, source)
        first = mx.argmax(lm.model(mx.array([prompt]), cache=cache)[0, -1]).item()
        index = NgramIndex()
        index.extend(prompt)
        session = DraftingSession(lm.drafter, lm.model, index)
        session.start(tap.hidden(source), first)
        index.extend([first])
        sessions.append(session)
    return sessions


def drive(lm, prompts, run):
    """Each prompt's session drafts 3, its drafter forwards answered by run(calls) a position at a
    time; returns each one's Drafts and the logits it was sent."""
    steps = [s.drafting(3, SamplingParams(), None) for s in started_sessions(lm, prompts)]
    asked, logits, drafts = [next(g) for g in steps], [[] for _ in prompts], [None] * len(prompts)
    while live := [i for i, a in enumerate(asked) if a is not None]:
        for i, reply in zip(live, run([asked[i] for i in live])):
            logits[i].append(np.array(reply[0]))
            try:
                asked[i] = steps[i].send(reply)
            except StopIteration as done:
                asked[i], drafts[i] = None, done.value
    return drafts, logits


def test_a_steps_drafts_run_in_one_drafter_forward_per_position(tiny_gguf, monkeypatch):
    """Three sequences draft 3 each: three drafter forwards, each over all three sequences, give
    each the drafts and the drafter logits it gets alone."""
    from daemon.models.loading import load

    lm = load(str(tiny_gguf), drafter="random")
    assert lm.drafter.ragged
    alone, alone_logits = drive(lm, PROMPTS[:3], lambda calls: [c.run(lm.model) for c in calls])
    forwards, ragged = [], type(lm.drafter).draft_ragged
    monkeypatch.setattr(type(lm.drafter), "draft_ragged",
                        lambda self, calls, target: forwards.append(len(calls)) or ragged(self, calls, target))
    together, logits = drive(lm, PROMPTS[:3], lambda calls: run_drafts(lm.model, calls))
    assert forwards == [3, 3, 3]
    assert [d.tokens for d in together] == [d.tokens for d in alone] and all(len(d.tokens) == 3 for d in alone)
    for mine, theirs in zip(logits, alone_logits):
        np.testing.assert_allclose(np.stack(mine), np.stack(theirs), rtol=1e-4, atol=1e-4)


def test_a_sequence_that_joins_or_leaves_changes_no_other(tiny_lm):
    requests = [Request(p, max_tokens=30) for p in PROMPTS[:3]]
    alone = [list(generate(tiny_lm, r, Fixed(0)))[-1].token_ids for r in requests]
    records = {}
    batch = Batch(tiny_lm.model, lambda owner, record: records.setdefault(owner, []).append(record), 64)
    batch.add(0, sequence(tiny_lm, requests[0], Fixed(0), chunk=4, batched=True))
    batch.add(1, sequence(tiny_lm, requests[1], Fixed(0), chunk=4, batched=True))
    for _ in range(5):
        batch.step()
    batch.drop(next(r for r in batch.running if r.owner == 1))  # a client leaves mid-answer
    batch.add(2, sequence(tiny_lm, requests[2], Fixed(0), chunk=4, batched=True))  # another arrives
    while batch.running:
        batch.step()
    assert records[0][-1].token_ids == alone[0] and records[2][-1].token_ids == alone[2]
    assert not isinstance(records[1][-1], Finished)


def test_a_failing_sequence_gets_its_error_and_the_others_go_on(tiny_lm):
    def failing():
        yield Delta((1,), "x")
        raise RuntimeError("broken")

    records = {}
    batch = Batch(tiny_lm.model, lambda owner, record: records.setdefault(owner, []).append(record), 64)
    batch.add("bad", failing())
    batch.add("good", sequence(tiny_lm, Request(PROMPTS[0], max_tokens=10), Fixed(0), batched=True))
    while batch.running:
        batch.step()
    assert isinstance(records["bad"][-1], RuntimeError)
    assert records["good"][-1].token_ids == list(generate(tiny_lm, Request(PROMPTS[0], max_tokens=10)))[-1].token_ids


def test_batched_sampling_reproduces_each_sequences_distribution(tiny_lm, monkeypatch):
    lm = small_vocab(tiny_lm.tokenizer, VOCAB, fast=True)
    prompt = [1, 5, 2]
    params = SamplingParams(temperature=1.3)
    lm = dataclasses.replace(lm, drafter=RuleDrafter(prompt[0], target_logits(lm.model), 32), drafter_name="rule")
    monkeypatch.setattr(lm.tokenizer, "_eos_token_ids", set())  # every token id is ordinary here
    runs, width = 2500, 50
    counts = np.zeros((VOCAB, VOCAB))
    batched_steps = 0
    for start in range(0, runs, width):
        requests = [Request(tuple(prompt), max_tokens=3, sampling=dataclasses.replace(params, seed=seed))
                    for seed in range(start, start + width)]
        done, reports = run_batch(lm, requests, [Fixed(2) for _ in requests], max_rows=256)
        batched_steps += sum(r.sequences > 1 for r in reports)
        for d in done:
            counts[d.token_ids[1], d.token_ids[2]] += 1
    expected = exact_joint(lm.model, prompt, params) * runs
    keep = expected >= 5
    assert counts[expected == 0].sum() == 0
    chi2 = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    rest = expected[~keep].sum()
    if rest > 0:
        chi2 += (counts[~keep].sum() - rest) ** 2 / rest
    assert chi2 < chi2_critical(int(keep.sum()) + (rest > 0) - 1), chi2
    assert batched_steps > 0


# --- the worker: no head-of-line blocking ------------------------------------------------------

def test_short_request_finishes_while_a_long_answer_runs(tiny_lm, monkeypatch):
    monkeypatch.setattr(tiny_lm.tokenizer, "_eos_token_ids", set())  # the long answer runs its 1,000 tokens
    worker = Worker(lambda entry: Loaded(tiny_lm, None, None), max_queue=4, limits=Limits(max_running=4))
    worker.start()
    events, done = [], threading.Event()

    def job(name, max_tokens):
        def deliver(record):
            if isinstance(record, Finished):
                events.append((name, record.completion_tokens, worker.running))
                if name == "long":
                    done.set()
        return Job(Request(PROMPTS[0], max_tokens=max_tokens), "off", deliver, time.monotonic() + 300)

    worker.submit(job("long", 1000))
    time.sleep(0.2)  # the long answer is under way
    worker.submit(job("short", 12))
    assert done.wait(300)
    worker.stop(30)
    assert [name for name, _, _ in events] == ["short", "long"]
    assert events[0][1] == 12 and events[1][1] == 1000
    assert events[0][2] == 2  # the long answer was still running when the short one ended


@pytest.mark.parametrize("last_alone", [True, False])
@pytest.mark.parametrize("length", [1, 2, 5, 6, 7, 16])
def test_chunked_prefill_fills_the_whole_prompt(tiny_lm, length, last_alone):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.engine.forward import prefill_rows

    prompt = PROMPTS[3][:length]
    sizes = itertools.cycle([3, 2, 4, 5])  # the chunk is asked again and again
    cache = make_prompt_cache(tiny_lm.model)
    logits, _ = drain(tiny_lm.model, prefill_rows(cache, prompt, chunk=lambda: next(sizes), last_alone=last_alone))
    whole = tiny_lm.model(mx.array([prompt]), cache=make_prompt_cache(tiny_lm.model))[:, -1, :]
    assert cache[0].offset == length
    assert mx.allclose(logits, whole, atol=1e-4).item()


def test_a_busy_model_does_not_hold_up_another_models_short_request(tiny_gguf):
    """Two models, one batch each, stepped in turn: a short answer of the second model ends long
    before the first model's 1,000-token answer, and each model answers as it does alone."""
    from daemon.models.loading import load
    from daemon.models.registry import Entry

    models = {name: Entry(name, str(tiny_gguf), "settings") for name in ("big", "small")}
    lms = {name: load(str(tiny_gguf)) for name in models}
    for lm in lms.values():
        lm.tokenizer._eos_token_ids = set()  # the long answer runs its 1,000 tokens
    worker = Worker(lambda entry: Loaded(lms[entry.name], None, None), max_queue=4, models=models)
    worker.start()
    events, done = [], threading.Event()

    def job(model, max_tokens):
        def deliver(record):
            if isinstance(record, Finished):
                events.append((model, record.token_ids))
                if model == "big":
                    done.set()
        return Job(Request(PROMPTS[0], max_tokens=max_tokens), "off", deliver, time.monotonic() + 300, model=model)

    worker.submit(job("big", 1000))
    time.sleep(0.2)  # the long answer is under way
    worker.submit(job("small", 12))
    assert done.wait(300)
    worker.stop(30)
    assert [model for model, _ in events] == ["small", "big"]
    alone = list(generate(lms["small"], Request(PROMPTS[0], max_tokens=12), Fixed(0)))[-1].token_ids
    assert tuple(events[0][1]) == tuple(alone) and tuple(events[1][1][:12]) == tuple(alone)

