"""SpecVLM's verifier-guided pruning of the draft's video tokens: which to keep, and the layout.

Pure functions over tensors, no vLLM import.

**Which tokens.** Each video item keeps ``ceil(keep_ratio x n)`` of its n embedding tokens. Stage I
takes the tokens with the highest target attention from the prompt's text queries (summed over
the text rows, heads and capture layers at prefill) until they hold ``stage1_share`` of the item's
total score; stage II spreads the rest of the budget evenly over the tokens stage I left. Without
scores (the item's question came in a later prefill chunk than the video) stage II takes the
whole budget. Deterministic: every tensor-parallel rank takes the same decision from the same
(all-reduced) scores.

**The layout.** A pruned token is absent from the draft's sequence: the draft's KV slot of
sequence position p is ``p - (pruned positions < p)`` in the request's own blocks, and its
sequence length shrinks by the pruned count. M-RoPE positions are the target's own, so the draft
still places every kept token where the video put it.
"""

from __future__ import annotations

import math

import torch


def keep_budget(n: int, keep_ratio: float) -> int:
    return min(n, max(1, math.ceil(keep_ratio * n - 1e-9)))


def select_kept(n: int, keep_ratio: float, stage1_share: float,
                scores: torch.Tensor | None = None) -> torch.Tensor:
    """[n] bool: the item's embedding tokens the draft keeps."""
    keep = torch.zeros(n, dtype=torch.bool)
    budget = keep_budget(n, keep_ratio)
    if budget >= n:
        keep[:] = True
        return keep
    taken = 0
    if scores is not None and stage1_share > 0:
        scores = scores.detach().float().cpu()
        total = float(scores.sum())
        if total > 0:
            order = torch.sort(scores, descending=True, stable=True).indices
            cum = torch.cumsum(scores[order], 0)
            need = int(torch.searchsorted(cum, torch.tensor(stage1_share * total))) + 1
            taken = min(budget, need, n)
            keep[order[:taken]] = True
    rest = (~keep).nonzero().squeeze(1)
    r = budget - taken
    if r > 0:
        picks = ((torch.arange(r, dtype=torch.float64) + 0.5) * rest.numel() / r).long()
        keep[rest[picks]] = True
    return keep


def compact_layout(seq_pos: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                   pruned: list[torch.Tensor | None]):
    """Where the first pass's rows go once pruned positions are dropped.

    seq_pos          [T] sequence position of each first-pass row (CPU, int64)
    query_start_loc  [B + 1] rows of each request (CPU)
    seq_lens         [B] each request's sequence length after this pass (CPU)
    pruned           per request: sorted pruned sequence positions (CPU int64), or None
    returns (keep [T] bool, draft_pos [T] compact positions, draft_seq_lens [B])
    """
    keep = torch.ones_like(seq_pos, dtype=torch.bool)
    draft_pos = seq_pos.clone()
    draft_seq_lens = seq_lens.clone()
    qsl = query_start_loc.tolist()
    for r, p in enumerate(pruned):
        if p is None or p.numel() == 0:
            continue
        a, b = qsl[r], qsl[r + 1]
        pos = seq_pos[a:b]
        before = torch.searchsorted(p, pos)  # pruned positions < pos
        hit = p[before.clamp(max=p.numel() - 1)] == pos
        keep[a:b] = ~hit
        draft_pos[a:b] = pos - before
        draft_seq_lens[r] = seq_lens[r] - torch.searchsorted(p, seq_lens[r:r + 1]).squeeze(0)
    return keep, draft_pos, draft_seq_lens
