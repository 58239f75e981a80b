"""SpecVLM's pruning of the draft's video tokens: selection, compacted layout, stage-I scores."""

import math

import pytest
import torch

from lvspec_vllm.drafter.pruning import compact_layout, keep_budget, select_kept
from lvspec_vllm.relevance.reference import key_attention


@pytest.mark.parametrize("n", [1, 7, 16, 100, 1000])
@pytest.mark.parametrize("ratio", [0.01, 0.1, 0.4, 1.0])
@pytest.mark.parametrize("share", [0.0, 0.4, 1.0])
def test_budget_is_kept_exactly(n, ratio, share):
    scores = torch.rand(n, generator=torch.Generator().manual_seed(n))
    for s in (scores, None):
        kept = select_kept(n, ratio, share, s)
        assert kept.dtype == torch.bool and kept.shape == (n,)
        assert int(kept.sum()) == keep_budget(n, ratio) == min(n, max(1, math.ceil(ratio * n)))


def test_ratio_one_keeps_everything():
    assert select_kept(50, 1.0, 0.4, torch.rand(50)).all()
    assert select_kept(50, 1.0, 0.4, None).all()


def test_stage_one_takes_the_top_scores_until_the_share():
    # the top token alone holds 49 % of the score: stage I takes it and stops (share 40 %)
    scores = torch.tensor([0.0, 5.0, 0.0, 2.5, 0.0, 1.0, 0.0, 0.5] + [0.1] * 12)
    total = float(scores.sum())
    kept = select_kept(20, 0.2, 0.4, scores)  # budget 4
    assert kept[1]  # the top token
    cum, need = 0.0, 0
    for v in sorted(scores.tolist(), reverse=True):
        cum += v
        need += 1
        if cum >= 0.4 * total:
            break
    assert need == 1
    # the other three are spread uniformly over the rest, not the next-highest scores
    others = kept.clone()
    others[1] = False
    assert int(others.sum()) == 3 and not (kept[3] and kept[5] and kept[7])


def test_stage_one_is_capped_by_the_budget():
    scores = torch.ones(10)  # a flat score needs many tokens for any share
    kept = select_kept(10, 0.2, 1.0, scores)
    assert int(kept.sum()) == 2


def test_without_scores_the_budget_is_spread_evenly():
    kept = select_kept(100, 0.1, 0.4, None).nonzero().squeeze(1)
    gaps = torch.diff(kept)
    assert kept.numel() == 10 and int(gaps.min()) == int(gaps.max()) == 10


def test_selection_is_deterministic_with_ties():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    a = select_kept(8, 0.25, 0.4, scores)
    assert torch.equal(a, select_kept(8, 0.25, 0.4, scores.clone()))
    assert a[0]  # stable order: the first of equals


def _layout_reference(seq_pos, qsl, seq_lens, pruned):
    keep, pos, lens = [], [], []
    for r in range(len(qsl) - 1):
        p = set(pruned[r].tolist()) if pruned[r] is not None else set()
        for i in range(qsl[r], qsl[r + 1]):
            x = int(seq_pos[i])
            keep.append(x not in p)
            pos.append(x - sum(1 for y in p if y < x))
        lens.append(int(seq_lens[r]) - sum(1 for y in p if y < int(seq_lens[r])))
    return torch.tensor(keep), torch.tensor(pos), torch.tensor(lens)


@pytest.mark.parametrize("seed", range(20))
def test_compact_layout_matches_a_loop(seed):
    g = torch.Generator().manual_seed(seed)
    batch = 1 + seed % 4
    rows, pruned, seq_pos, seq_lens, qsl = [], [], [], [], [0]
    for r in range(batch):
        start = int(torch.randint(0, 60, (1,), generator=g))
        n = int(torch.randint(1, 40, (1,), generator=g))
        seq_pos.append(torch.arange(start, start + n))
        seq_lens.append(start + n)
        qsl.append(qsl[-1] + n)
        if r % 3 == 2:
            pruned.append(None)
        else:
            cand = torch.randperm(start + n, generator=g)[: (start + n) // 3]
            pruned.append(cand.sort().values)
    seq_pos = torch.cat(seq_pos)
    got = compact_layout(seq_pos, torch.tensor(qsl), torch.tensor(seq_lens), pruned)
    want = _layout_reference(seq_pos, qsl, seq_lens, pruned)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_kept_positions_are_dense_and_ordered():
    """Every kept position of a whole sequence lands on 0, 1, 2, ...: no hole, no collision."""
    seq = torch.arange(30)
    pruned = torch.tensor([3, 4, 5, 10, 11, 20])
    keep, pos, lens = compact_layout(seq, torch.tensor([0, 30]), torch.tensor([30]), [pruned])
    assert torch.equal(pos[keep], torch.arange(24)) and int(lens[0]) == 24


@pytest.mark.parametrize("gqa", [1, 2, 4])
def test_key_attention_sums_softmax_weights(gqa):
    g = torch.Generator().manual_seed(gqa)
    R, Hkv, D, N = 5, 2, 8, 12
    q = torch.randn(R, Hkv * gqa, D, generator=g)
    k = torch.randn(N, Hkv, D, generator=g)
    ctx = torch.tensor([8, 9, 10, 11, 12])
    got = key_attention(q, k, ctx, 0.3)
    want = torch.zeros(N)
    for r in range(R):
        for h in range(Hkv * gqa):
            w = torch.softmax((k[: ctx[r], h // gqa] @ q[r, h]) * 0.3, dim=0)
            want[: ctx[r]] += w
    torch.testing.assert_close(got, want)
    assert abs(float(got.sum()) - R * Hkv * gqa) < 1e-4  # each row and head sums to one
