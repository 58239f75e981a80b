"""The verification rules (plain-torch reference): hand-made cases, then random properties."""

import math

import pytest
import torch

from lvspec_vllm.verify import rules as R

V = 32
INF = float("inf")


def _batch(drafts, targets, *, thresholds=None, v=None, codebook=None, guard=(), emb=None,
           temperature=None, second=None, second_gap=1.0):
    """Build a verify batch whose row j has argmax targets[j] (logit 10) and, optionally, token
    second[j] at 10 - second_gap; every other logit is 0."""
    drafts_flat = [d for req in drafts for d in req]
    targets_flat = [t for req in targets for t in req]
    T = len(drafts_flat)
    logits = torch.zeros(T, V)
    for j, t in enumerate(targets_flat):
        logits[j, t] = 10.0
        if second is not None and second[j] is not None:
            logits[j, second[j]] = 10.0 - second_gap
    cu = torch.tensor([len(r) for r in drafts]).cumsum(0)
    B = len(drafts)
    g = torch.zeros(V, dtype=torch.bool)
    g[list(guard)] = True
    return dict(
        draft_token_ids=torch.tensor(drafts_flat), cu_num_draft_tokens=cu, logits=logits,
        temperature=torch.ones(B) if temperature is None else torch.tensor(temperature),
        relevance=None if v is None else torch.tensor(v, dtype=torch.float32),
        anchor_threshold=torch.full((B,), INF) if thresholds is None else torch.tensor(thresholds),
        codebook=torch.full((B, 4), -1) if codebook is None else torch.tensor(codebook),
        guard_mask=g, embeddings=emb)


def _run(params=R.VerifyParams(), **kw):
    return R.verify_reference(**_batch(**kw), params=params)


def test_exact_matches_are_accepted_until_the_first_mismatch_in_strict_mode():
    res = _run(drafts=[[1, 2, 3, 4]], targets=[[1, 2, 9, 4]], thresholds=[-INF])
    assert res.num_accepted.tolist() == [2]
    assert res.rule.tolist() == [R.EXACT, R.EXACT, R.REJECTED, R.REJECTED]
    assert res.stop.tolist() == [R.STOP_ANCHOR]


def test_plausible_filler_is_accepted_loosely():
    # row 1: target 9, draft 5 is second with gap 0.5 -> ratio e^-0.5 = 0.61 >= 0.3, rank 1 < 5
    res = _run(drafts=[[1, 5, 3]], targets=[[1, 9, 3]], second=[None, 5, None], second_gap=0.5)
    assert res.num_accepted.tolist() == [3]
    assert res.rule.tolist() == [R.EXACT, R.PLAUSIBLE, R.EXACT]


def test_implausible_filler_is_rejected():
    # gap 3 -> ratio e^-3 = 0.05 < 0.3
    res = _run(drafts=[[5, 3]], targets=[[9, 3]], second=[5, None], second_gap=3.0)
    assert res.num_accepted.tolist() == [0] and res.stop.tolist() == [R.STOP_NO_RULE]


def test_plausibility_respects_temperature_and_top_k():
    kw = dict(drafts=[[5]], targets=[[9]], second=[5], second_gap=3.0)
    assert _run(**kw, temperature=[4.0]).num_accepted.tolist() == [1]  # e^-0.75 = 0.47
    p = R.VerifyParams(plausibility_top_k=1)
    assert _run(p, drafts=[[5]], targets=[[9]], second=[5], second_gap=0.1).num_accepted.tolist() == [0]


def test_anchor_by_relevance_codebook_and_guard_is_strict():
    kw = dict(drafts=[[5]], targets=[[9]], second=[5], second_gap=0.1)
    assert _run(**kw, thresholds=[0.5], v=[0.7]).stop.tolist() == [R.STOP_ANCHOR]
    assert _run(**kw, thresholds=[0.5], v=[0.3]).num_accepted.tolist() == [1]
    assert _run(**kw, codebook=[[9, -1, -1, -1]]).stop.tolist() == [R.STOP_ANCHOR]
    assert _run(**kw, codebook=[[5, -1, -1, -1]]).stop.tolist() == [R.STOP_ANCHOR]
    assert _run(**kw, guard=[9]).stop.tolist() == [R.STOP_GUARD]
    assert _run(**kw, guard=[5]).stop.tolist() == [R.STOP_GUARD]


def test_exact_anchor_is_accepted():
    res = _run(drafts=[[9]], targets=[[9]], guard=[9], thresholds=[-INF])
    assert res.num_accepted.tolist() == [1] and res.anchor.tolist() == [True]


def test_banned_draft_token_is_never_loosely_accepted():
    b = _batch(drafts=[[5]], targets=[[9]], second=[5], second_gap=0.1)
    b["logits"][0, 5] = -INF
    emb = torch.eye(V)
    emb[5] = emb[9]  # semantically identical, but banned
    b["embeddings"] = emb
    assert R.verify_reference(**b, params=R.VerifyParams()).num_accepted.tolist() == [0]


def test_semantic_equivalence_uses_embedding_cosine():
    emb = torch.eye(V)
    emb[5] = emb[9] + 0.1 * emb[3]  # cos ~ 0.995 with 9
    kw = dict(drafts=[[5]], targets=[[9]], emb=emb)
    res = _run(R.VerifyParams(plausibility=False), **kw)
    assert res.rule.tolist() == [R.SEMANTIC]
    assert _run(R.VerifyParams(plausibility=False, semantic=False), **kw).num_accepted.tolist() == [0]
    assert _run(R.VerifyParams(plausibility=False, semantic_threshold=0.999),
                **kw).num_accepted.tolist() == [0]


def test_shift_accepts_an_inserted_filler_when_the_draft_rejoins():
    # target wants 7 at row 0; the draft inserted 5, then 7 (exact at row 1), then 8
    p = R.VerifyParams(plausibility=False, semantic=False)
    res = _run(p, drafts=[[5, 7, 8]], targets=[[7, 7, 8]])
    assert res.num_accepted.tolist() == [3]
    assert res.rule.tolist() == [R.SHIFTED, R.EXACT, R.EXACT]
    # the rejoining position must itself be accepted
    res = _run(p, drafts=[[5, 7, 8]], targets=[[7, 6, 8]])
    assert res.num_accepted.tolist() == [0]
    # two inserted tokens need window 2
    res = _run(p, drafts=[[5, 6, 7]], targets=[[7, 1, 7]])
    assert res.num_accepted.tolist() == [3]
    assert _run(R.VerifyParams(plausibility=False, semantic=False, shift_window=1),
                drafts=[[5, 6, 7]], targets=[[7, 1, 7]]).num_accepted.tolist() == [0]
    # an anchor cannot be inserted
    assert _run(p, drafts=[[5, 6, 7]], targets=[[7, 1, 7]], guard=[6]).num_accepted.tolist() == [0]
    # switched off
    assert _run(R.VerifyParams(plausibility=False, semantic=False, shift=False),
                drafts=[[5, 7, 8]], targets=[[7, 7, 8]]).num_accepted.tolist() == [0]


def test_shift_never_crosses_into_the_next_request():
    p = R.VerifyParams(plausibility=False, semantic=False)
    res = _run(p, drafts=[[5], [7, 1]], targets=[[7], [7, 1]])
    assert res.num_accepted.tolist() == [0, 2]


def test_budget_caps_loose_accepts():
    kw = dict(drafts=[[5, 6, 3]], targets=[[9, 9, 3]], second=[5, 6, None], second_gap=0.1)
    assert _run(**kw).num_accepted.tolist() == [3]
    res = _run(R.VerifyParams(max_loose_per_step=1), **kw)
    assert res.num_accepted.tolist() == [1] and res.stop.tolist() == [R.STOP_BUDGET]


def test_entropy_gate_keeps_confident_rows_strict():
    kw = dict(drafts=[[5]], targets=[[9]], second=[5], second_gap=0.5)
    assert _run(R.VerifyParams(entropy_gate=0.01), **kw).num_accepted.tolist() == [1]
    res = _run(R.VerifyParams(entropy_gate=2.0), **kw)  # top-3 entropy < ln 3 < 2
    assert res.num_accepted.tolist() == [0] and res.stop.tolist() == [R.STOP_ENTROPY]


# -- properties on random batches ---------------------------------------------------------------

def _random_batch(seed, B=12, kmax=8, vocab=64, loose_frac=0.5):
    g = torch.Generator().manual_seed(seed)
    ks = torch.randint(1, kmax + 1, (B,), generator=g)
    T = int(ks.sum())
    logits = torch.randn(T, vocab, generator=g) * 2
    t = logits.argmax(1)
    # drafts: mostly the argmax, sometimes a random token, sometimes the second best
    d = torch.where(torch.rand(T, generator=g) < 0.6, t, torch.randint(0, vocab, (T,), generator=g))
    second = logits.topk(2, dim=1).indices[:, 1]
    d = torch.where(torch.rand(T, generator=g) < 0.2, second, d)
    thr = torch.where(torch.rand(B, generator=g) < loose_frac, torch.rand(B, generator=g),
                      torch.full((B,), -INF))
    guard = torch.rand(vocab, generator=g) < 0.1
    return dict(draft_token_ids=d, cu_num_draft_tokens=ks.cumsum(0), logits=logits,
                temperature=torch.ones(B), relevance=torch.rand(T, generator=g),
                anchor_threshold=thr, codebook=torch.randint(-1, vocab, (B, 3), generator=g),
                guard_mask=guard, embeddings=torch.randn(vocab, 16, generator=g))


@pytest.mark.parametrize("seed", range(30))
def test_random_batches_keep_the_invariants(seed):
    b = _random_batch(seed)
    params = R.VerifyParams(max_loose_per_step=3 if seed % 2 else None,
                            entropy_gate=0.5 if seed % 3 == 0 else None)
    res = R.verify_reference(**b, params=params)
    cu = [0] + b["cu_num_draft_tokens"].tolist()
    rule, anchor = res.rule.tolist(), res.anchor.tolist()
    d, t = b["draft_token_ids"].tolist(), res.target_argmax.tolist()
    for r in range(len(cu) - 1):
        lo, hi, a = cu[r], cu[r + 1], int(res.num_accepted[r])
        assert 0 <= a <= hi - lo
        # exactly the prefix is marked accepted
        assert all(rule[j] != R.REJECTED for j in range(lo, lo + a))
        assert all(rule[j] == R.REJECTED for j in range(lo + a, hi))
        for j in range(lo, lo + a):
            assert (rule[j] == R.EXACT) == (d[j] == t[j])
            assert not (anchor[j] and rule[j] != R.EXACT), "an anchor was accepted loosely"
        if params.max_loose_per_step is not None:
            assert sum(rule[j] > R.EXACT for j in range(lo, hi)) <= params.max_loose_per_step
        if a < hi - lo:
            assert d[lo + a] != t[lo + a] and res.stop[r] != R.STOP_NONE
        if b["anchor_threshold"][r] == -INF:  # strict request: leading exact matches only
            lead = 0
            while lead < hi - lo and d[lo + lead] == t[lo + lead]:
                lead += 1
            assert a == lead


@pytest.mark.parametrize("seed", range(10))
def test_switching_every_loose_rule_off_is_strict(seed):
    b = _random_batch(seed, loose_frac=1.0)
    off = R.VerifyParams(plausibility=False, semantic=False, shift=False)
    res = R.verify_reference(**b, params=off)
    strict = R.verify_reference(**{**b, "anchor_threshold": torch.full_like(
        b["anchor_threshold"], -INF)}, params=R.VerifyParams())
    assert torch.equal(res.num_accepted, strict.num_accepted)


def test_an_inserted_token_that_matches_its_own_row_counts_as_exact():
    # the draft inserted 5 and 1 before 7; row 1's target happens to be 1 as well
    p = R.VerifyParams(plausibility=False, semantic=False, max_loose_per_step=1)
    res = _run(p, drafts=[[5, 1, 7]], targets=[[7, 1, 7]])
    assert res.rule.tolist() == [R.SHIFTED, R.EXACT, R.EXACT]
    assert res.num_accepted.tolist() == [3]  # one loose accept: within the budget of 1
