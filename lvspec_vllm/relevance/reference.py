"""Visual relevance v_j: the target's attention mass on the request's visual tokens.

Plain-torch reference, no vLLM import. For one verify row (query q at one position) and one
query head h, the mass is

    m_h = sum over visual keys i < ctx of softmax_i(q_h . k_i * scale)      (softmax over all i < ctx)
        = exp(LSE_visual - LSE_all)

and v_j is the mean of m_h over query heads and the configured layers. GQA: query head h reads
key head h // (Hq // Hkv). Attention weights are never materialised beyond one row's scores.
"""

from __future__ import annotations

import torch


def _causal_scores(query: torch.Tensor, keys: torch.Tensor, context_len: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """[R, Hq, N] float32 scaled q.k of every row and key, -inf beyond each row's context (GQA:
    query head h reads key head h // (Hq // Hkv))."""
    Hq, Hkv = query.shape[1], keys.shape[1]
    k = keys.float().repeat_interleave(Hq // Hkv, dim=1)             # [N, Hq, D]
    scores = torch.einsum("rhd,nhd->rhn", query.float(), k) * scale  # [R, Hq, N]
    pos = torch.arange(keys.shape[0], device=query.device)
    causal = pos[None, :] < context_len[:, None].to(query.device)   # [R, N]
    return scores.masked_fill(~causal[:, None, :], float("-inf"))


def visual_mass(query: torch.Tensor, keys: torch.Tensor, visual: torch.Tensor,
                context_len: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head visual attention mass of R query rows of one request.

    query        [R, Hq, D]  post-RoPE queries of the rows
    keys         [N, Hkv, D] post-RoPE keys of the request's positions 0..N-1
    visual       [N] bool    positions holding image/video embeddings
    context_len  [R] int     row r attends to positions [0, context_len[r]) (causal)
    returns      [R, Hq] float32; 0 where no visual key is in context
    """
    scores = _causal_scores(query, keys, context_len, scale)
    lse_all = torch.logsumexp(scores, dim=-1)
    vis_scores = scores.masked_fill(~visual.to(query.device)[None, None, :], float("-inf"))
    lse_vis = torch.logsumexp(vis_scores, dim=-1)
    return torch.exp(lse_vis - lse_all)  # exp(-inf) = 0 when no visual key


def batched_visual_mass(query: torch.Tensor, keys: torch.Tensor, visual: torch.Tensor,
                        row_req: torch.Tensor, context_len: torch.Tensor,
                        scale: float) -> torch.Tensor:
    """``visual_mass`` for the verify rows of several requests in one batch of tensor ops.

    query        [R, Hq, D]     post-RoPE queries, rows of any request in any order
    keys         [B, N, Hkv, D] post-RoPE keys, request b's positions 0..N-1 (padded past its
                                length; padding is never in a row's context)
    visual       [B, N] bool    positions holding image/video embeddings
    row_req      [R] int        the request (index into keys) of each row
    context_len  [R] int        row r attends to positions [0, context_len[r]) of its request
    returns      [R, Hq] float32, row for row what ``visual_mass`` gives for the row's request
    """
    R, Hq, D = query.shape
    Hkv = keys.shape[2]
    k = keys[row_req].float()                                         # [R, N, Hkv, D]
    q = query.float().view(R, Hkv, Hq // Hkv, D)                      # head h reads h // G
    scores = torch.einsum("rkgd,rnkd->rkgn", q, k).reshape(R, Hq, -1) * scale
    pos = torch.arange(keys.shape[1], device=query.device)
    causal = pos[None, :] < context_len[:, None].to(query.device)   # [R, N]
    scores = scores.masked_fill(~causal[:, None, :], float("-inf"))
    lse_all = torch.logsumexp(scores, dim=-1)
    vis = visual.to(query.device)[row_req]                            # [R, N]
    lse_vis = torch.logsumexp(scores.masked_fill(~vis[:, None, :], float("-inf")), dim=-1)
    return torch.exp(lse_vis - lse_all)


def key_attention(query: torch.Tensor, keys: torch.Tensor, context_len: torch.Tensor,
                  scale: float) -> torch.Tensor:
    """[N] float32: the attention weight each key receives, summed over R query rows and all
    query heads (softmax over each row's causal context). SpecVLM's stage-I score of a video
    token, from the prompt's text queries at prefill.

    query [R, Hq, D], keys [N, Hkv, D] post-RoPE; context_len [R]: row r attends to [0, ctx_r).
    """
    return torch.softmax(_causal_scores(query, keys, context_len, scale), dim=-1).sum(dim=(0, 1))


def relevance_from_masses(masses: list[torch.Tensor]) -> torch.Tensor:
    """v_j: the mean over layers (list entries, each [R, Hq]) and query heads."""
    return torch.stack(masses).mean(dim=(0, 2))


def visual_ranges(mm_positions, device="cpu") -> torch.Tensor:
    """[n, 2] int32 (start, end) runs of embedding positions from vLLM's PlaceholderRanges
    (``offset``, ``length``, optional ``is_embed`` mask within the range)."""
    runs = []
    for p in mm_positions:
        if p.is_embed is None:
            runs.append(torch.tensor([[p.offset, p.offset + p.length]]))
            continue
        # run boundaries of the mask, without a Python loop over a long video's tokens
        mask = torch.as_tensor(p.is_embed, dtype=torch.int8).cpu()
        edges = torch.diff(mask, prepend=mask.new_zeros(1), append=mask.new_zeros(1))
        starts = (edges == 1).nonzero().squeeze(1)
        ends = (edges == -1).nonzero().squeeze(1)
        runs.append(torch.stack([starts, ends], dim=1) + p.offset)
    if not runs:
        return torch.zeros(0, 2, dtype=torch.int32, device=device)
    return torch.cat(runs).to(device=device, dtype=torch.int32)
