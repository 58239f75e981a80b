"""LVSpec's verification rules: the plain-torch reference. No vLLM import.

Inputs follow vLLM's flattened verify layout: request r owns the draft positions
``cu[r-1]:cu[r]`` (``cu_num_draft_tokens`` is the inclusive cumulative count), and row j of
``logits`` is the target's (processed) distribution that verifies draft token j.

Per position j (d = draft token, t = argmax of the row):
  exact      d == t: always accepted.
  anchor     v_j >= the request's threshold, or t or d in the request's codebook, or t or d a
             guarded id. An anchor that is not exact stops the prefix.
  plausible  (z_d - z_t) / T >= ln(beta) and d in the row's top-k (ties counted in d's favour).
  semantic   cos(E[d], E[t]) >= gamma over the target's embedding rows.
  shift      the draft inserted s in 1..w filler tokens: d_{j+s} is t_j (or equivalent to it),
             d_j .. d_{j+s-1} are not anchors, and position j+s is itself accepted by the exact,
             plausible or semantic rule. d_j .. d_{j+s-1} are accepted as shifted.
  entropy    optional gate: a mismatch where the top-3 entropy of the row is below eta is strict.
  budget     optional cap on loose accepts per request and step.
A draft token the target cannot emit (logit -inf: bad words, grammar masks) is never loosely
accepted. The accepted length is the longest prefix accepted by these rules.

Per-request strictness is carried by ``anchor_threshold``: -inf makes every position an anchor
(strict, lossless), +inf disables relevance anchors (no identification).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# rule codes, per draft position
REJECTED, EXACT, PLAUSIBLE, SEMANTIC, SHIFTED = 0, 1, 2, 3, 4
RULE_NAMES = ("rejected", "exact", "plausible", "semantic", "shifted")
# why a request's prefix stopped before its last draft
STOP_NONE, STOP_ANCHOR, STOP_GUARD, STOP_NO_RULE, STOP_BUDGET, STOP_ENTROPY = range(6)
STOP_NAMES = ("none", "anchor", "guard", "no_rule", "budget", "entropy")


@dataclass(frozen=True)
class VerifyParams:
    plausibility: bool = True
    plausibility_ratio: float = 0.3
    plausibility_top_k: int = 5
    semantic: bool = True
    semantic_threshold: float = 0.8
    shift: bool = True
    shift_window: int = 2
    entropy_gate: float | None = None
    max_loose_per_step: int | None = None


@dataclass
class VerifyResult:
    num_accepted: torch.Tensor  # [B] int32: accepted draft prefix length
    rule: torch.Tensor          # [T] int8: rule that accepted each position (REJECTED beyond)
    anchor: torch.Tensor        # [T] bool: position judged an anchor
    stop: torch.Tensor          # [B] int8: why the prefix stopped
    target_argmax: torch.Tensor  # [T] int64


@dataclass
class PositionFeatures:
    """Everything the prefix scan needs, per draft position, computed batch-wide."""
    target_argmax: torch.Tensor  # [T] int64
    exact: torch.Tensor          # [T] bool
    emittable: torch.Tensor      # [T] bool: draft logit finite
    anchor: torch.Tensor         # [T] bool
    guard: torch.Tensor          # [T] bool
    plausible: torch.Tensor      # [T] bool
    semantic: torch.Tensor       # [T] bool
    low_entropy: torch.Tensor    # [T] bool
    shift_match: torch.Tensor    # [T, w] bool: d_{j+s} equivalent to t_j (same request), s=1..w


def request_index(cu_num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """[T] request index of every draft position."""
    counts = torch.diff(cu_num_draft_tokens, prepend=cu_num_draft_tokens.new_zeros(1))
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts)


def _cosine(a_ids: torch.Tensor, b_ids: torch.Tensor, emb) -> torch.Tensor:
    """``emb``: the [V, H] embedding matrix, or a callable ids -> rows (a vocab-sharded
    embedding module under tensor parallelism gathers the rows itself)."""
    rows = emb if callable(emb) else emb.__getitem__
    a = rows(a_ids).float()
    b = rows(b_ids).float()
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def position_features(draft_token_ids, cu_num_draft_tokens, logits, temperature, relevance,
                      anchor_threshold, codebook, guard_mask, embeddings,
                      params: VerifyParams) -> PositionFeatures:
    T = draft_token_ids.numel()
    req = request_index(cu_num_draft_tokens)
    d = draft_token_ids.long()
    z = logits.float()
    t = z.argmax(dim=-1)
    z_d = z.gather(1, d[:, None])[:, 0]
    z_t = z.gather(1, t[:, None])[:, 0]
    exact = d == t
    emittable = torch.isfinite(z_d)

    guard = guard_mask[t] | guard_mask[d]
    in_codebook = ((codebook[req] == t[:, None]) | (codebook[req] == d[:, None])).any(dim=1) \
        if codebook.numel() else torch.zeros(T, dtype=torch.bool, device=d.device)
    v = relevance.float() if relevance is not None else torch.zeros(T, device=z.device)
    anchor = (v >= anchor_threshold[req].float()) | in_codebook | guard

    temp = temperature[req].float()
    if params.plausibility:
        ratio_ok = (z_d - z_t) / temp >= math.log(params.plausibility_ratio)
        rank = (z > z_d[:, None]).sum(dim=1)
        plausible = ratio_ok & (rank < params.plausibility_top_k)
    else:
        plausible = torch.zeros(T, dtype=torch.bool, device=z.device)

    if params.semantic and embeddings is not None:
        semantic = _cosine(d, t, embeddings) >= params.semantic_threshold
    else:
        semantic = torch.zeros(T, dtype=torch.bool, device=z.device)

    if params.entropy_gate is not None:
        top3 = torch.topk(z / temp[:, None], k=min(3, z.shape[1]), dim=1).values
        p3 = torch.softmax(top3, dim=1)
        entropy = -(p3 * torch.log(p3.clamp_min(1e-30))).sum(dim=1)
        low_entropy = entropy < params.entropy_gate
    else:
        low_entropy = torch.zeros(T, dtype=torch.bool, device=z.device)

    w = params.shift_window if params.shift else 0
    shift_match = torch.zeros(T, max(w, 1), dtype=torch.bool, device=z.device)
    for s in range(1, w + 1):
        if T <= s:
            break
        same_req = req[s:] == req[:-s]
        match = d[s:] == t[:-s]
        if params.semantic and embeddings is not None:
            match = match | (_cosine(d[s:], t[:-s], embeddings) >= params.semantic_threshold)
        shift_match[:-s, s - 1] = same_req & match
    return PositionFeatures(t, exact, emittable, anchor, guard, plausible, semantic,
                            low_entropy, shift_match)


def accepted_prefix(f: PositionFeatures, cu_num_draft_tokens: torch.Tensor,
                    params: VerifyParams) -> VerifyResult:
    """The sequential part: walk each request's drafts and apply the rules in order."""
    T = f.exact.numel()
    B = cu_num_draft_tokens.numel()
    cu = [0] + cu_num_draft_tokens.tolist()
    exact, emit, anchor, guard = (x.tolist() for x in (f.exact, f.emittable, f.anchor, f.guard))
    plaus, sem, lowent = (x.tolist() for x in (f.plausible, f.semantic, f.low_entropy))
    shift = f.shift_match.tolist()
    w = params.shift_window if params.shift else 0
    budget_cap = params.max_loose_per_step
    rule = [REJECTED] * T
    num_accepted = [0] * B
    stop = [STOP_NONE] * B

    def loose_ok(i):  # accepted at its own row by a non-shift rule
        return exact[i] or (not anchor[i] and emit[i] and not lowent[i] and (plaus[i] or sem[i]))

    for r in range(B):
        lo, hi = cu[r], cu[r + 1]
        j, used = lo, 0
        while j < hi:
            if exact[j]:
                rule[j] = EXACT
                j += 1
                continue
            if anchor[j]:
                stop[r] = STOP_GUARD if guard[j] else STOP_ANCHOR
                break
            if not emit[j]:
                stop[r] = STOP_NO_RULE
                break
            if lowent[j]:
                stop[r] = STOP_ENTROPY
                break
            if plaus[j] or sem[j]:
                if budget_cap is not None and used >= budget_cap:
                    stop[r] = STOP_BUDGET
                    break
                rule[j] = PLAUSIBLE if plaus[j] else SEMANTIC
                used += 1
                j += 1
                continue
            shifted = 0
            for s in range(1, w + 1):
                k = j + s
                if k >= hi:
                    break
                inserted_ok = all(not anchor[i] and emit[i] and not lowent[i]
                                  for i in range(j + 1, k))
                if not inserted_ok:
                    break  # a longer insertion would contain the same anchor
                if shift[j][s - 1] and loose_ok(k):
                    shifted = s
                    break
            if shifted == 0:
                stop[r] = STOP_NO_RULE
                break
            # an inserted token may still match its own row: exact, and free of budget
            loose_inserted = sum(not exact[i] for i in range(j, j + shifted))
            rejoin_cost = 0 if exact[j + shifted] else 1  # the rejoining position is loose too
            if budget_cap is not None and used + loose_inserted + rejoin_cost > budget_cap:
                stop[r] = STOP_BUDGET
                break
            for i in range(j, j + shifted):
                rule[i] = EXACT if exact[i] else SHIFTED
            used += loose_inserted
            j += shifted
        num_accepted[r] = j - lo
    dev = f.exact.device
    return VerifyResult(
        num_accepted=torch.tensor(num_accepted, dtype=torch.int32, device=dev),
        rule=torch.tensor(rule, dtype=torch.int8, device=dev),
        anchor=f.anchor, stop=torch.tensor(stop, dtype=torch.int8, device=dev),
        target_argmax=f.target_argmax)


def verify_reference(draft_token_ids, cu_num_draft_tokens, logits, temperature, relevance,
                     anchor_threshold, codebook, guard_mask, embeddings,
                     params: VerifyParams) -> VerifyResult:
    """Accepted prefix of every request in one flattened verify batch (see module doc)."""
    f = position_features(draft_token_ids, cu_num_draft_tokens, logits, temperature, relevance,
                          anchor_threshold, codebook, guard_mask, embeddings, params)
    return accepted_prefix(f, cu_num_draft_tokens, params)
