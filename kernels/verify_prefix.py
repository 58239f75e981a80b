"""LVSpec verification as one Triton kernel: ``verify_triton`` == ``rules.verify_reference``.

One program per request (grid ``(B,)``), in two phases:

1. Per draft position ``p`` of the request, stream the logits row over V in ``BLOCK_V`` chunks:
   running max/argmax (ties to the lowest index, like ``torch.argmax``), the number of logits
   strictly greater than the draft's (its top-k rank) and, with the entropy gate, the running
   top-3. Together with the anchor inputs and the embedding cosines (streamed over H) this gives
   every field of ``rules.PositionFeatures``; they are packed into one int32 of flag bits per
   position in a scratch buffer, and ``target_argmax``/``anchor`` are written out.
2. After a barrier, the same program walks the packed flags and applies ``accepted_prefix``
   literally, writing ``rule`` for every position and ``num_accepted``/``stop`` for the request.

A shift match ``M[p, s]`` compares ``d_{p+s}`` (an input) with ``t_p`` (this row's argmax), so it
is computed with row ``p`` and needs no second pass. Rule switches are constexprs, so disabled
rules compile away. Everything is computed in float32 and the reference's divisions are
IEEE-rounded here too (``div_rn``), so argmax, ranks and every flag match it bit for bit; only
the cosines and the top-3 entropy may differ from torch's in the last bits, which matters only
for a value within rounding of its threshold.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from lvspec_vllm.verify.rules import (EXACT, PLAUSIBLE, REJECTED, SEMANTIC, SHIFTED,
                                      STOP_ANCHOR, STOP_BUDGET, STOP_ENTROPY, STOP_GUARD,
                                      STOP_NO_RULE, STOP_NONE, VerifyParams, VerifyResult)

# Triton only reads module globals that are constexprs.
_REJECTED, _EXACT, _PLAUSIBLE = tl.constexpr(REJECTED), tl.constexpr(EXACT), tl.constexpr(PLAUSIBLE)
_SEMANTIC, _SHIFTED = tl.constexpr(SEMANTIC), tl.constexpr(SHIFTED)
_STOP_NONE, _STOP_ANCHOR = tl.constexpr(STOP_NONE), tl.constexpr(STOP_ANCHOR)
_STOP_GUARD, _STOP_NO_RULE = tl.constexpr(STOP_GUARD), tl.constexpr(STOP_NO_RULE)
_STOP_BUDGET, _STOP_ENTROPY = tl.constexpr(STOP_BUDGET), tl.constexpr(STOP_ENTROPY)

# Bits of the packed per-position flags; bit _F_SHIFT + s - 1 holds the shift match M[p, s].
_F_EXACT, _F_EMIT, _F_ANCHOR, _F_GUARD = (tl.constexpr(b) for b in range(4))
_F_PLAUS, _F_SEM, _F_LOWENT, _F_SHIFT = (tl.constexpr(b) for b in range(4, 8))
# A request has at most 16 drafts, so no shift is longer than 15; this keeps every flag shift
# below 32 bits (BLOCK_W <= 16).
MAX_SHIFT_WINDOW = 15


@triton.jit
def _verify_prefix_kernel(
        draft_ptr, cu_ptr, logits_ptr, stride_l, temp_ptr, rel_ptr, thr_ptr,
        codebook_ptr, stride_c, C, guard_ptr, emb_ptr, stride_e, H, V,
        flags_ptr, num_accepted_ptr, rule_ptr, anchor_ptr, stop_ptr, argmax_ptr,
        log_ratio, top_k, gamma, entropy_gate, budget,
        HAS_REL: tl.constexpr, PLAUS: tl.constexpr, SEM: tl.constexpr, ENTROPY: tl.constexpr,
        BUDGET: tl.constexpr, W: tl.constexpr, BLOCK_W: tl.constexpr,
        BLOCK_V: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_H: tl.constexpr):
    r = tl.program_id(0)
    hi = tl.load(cu_ptr + r).to(tl.int64)
    lo = tl.load(cu_ptr + r - 1, mask=r > 0, other=0).to(tl.int64)
    n = (hi - lo).to(tl.int32)
    temp = tl.load(temp_ptr + r).to(tl.float32)
    thr = tl.load(thr_ptr + r).to(tl.float32)
    offs_v = tl.arange(0, BLOCK_V)
    offs_w = tl.arange(0, BLOCK_W)  # 0: the position itself, s = 1..W: the shift window
    NEG_INF: tl.constexpr = float("-inf")

    # -- phase 1: the features of every position of the request ---------------------------------
    for p in range(lo, hi):
        d = tl.load(draft_ptr + p).to(tl.int64)
        row = logits_ptr + p * stride_l
        z_d = tl.load(row + d).to(tl.float32)
        z_t = tl.full((), NEG_INF, tl.float32)
        t = tl.zeros((), tl.int32)
        n_greater = tl.zeros((), tl.int32)
        top1 = tl.full((), NEG_INF, tl.float32)  # running top-3 of the row, for the entropy gate
        top2 = tl.full((), NEG_INF, tl.float32)
        top3 = tl.full((), NEG_INF, tl.float32)
        for v0 in range(0, V, BLOCK_V):
            x = tl.load(row + v0 + offs_v, mask=v0 + offs_v < V, other=NEG_INF).to(tl.float32)
            m, i = tl.max(x, 0, return_indices=True)  # ties: the lowest index, as torch
            # strictly greater: an equal maximum in a later chunk keeps the earlier index
            t = tl.where(m > z_t, v0 + i, t)
            z_t = tl.maximum(m, z_t)
            n_greater += tl.sum((x > z_d).to(tl.int32), 0)
            if ENTROPY:
                # the chunk's top 3 (removing by index keeps duplicates, like torch.topk)...
                x = tl.where(offs_v == i, NEG_INF, x)
                m2, i2 = tl.max(x, 0, return_indices=True)
                m3 = tl.max(tl.where(offs_v == i2, NEG_INF, x), 0)
                # ...merged into the running one: the k-th largest of two sorted lists a, b is
                # the max over i + j = k of min(a_i, b_j), with a_0 = b_0 = +inf
                top3 = tl.maximum(tl.maximum(m3, tl.minimum(top1, m2)),
                                  tl.maximum(tl.minimum(top2, m), top3))
                top2 = tl.maximum(tl.maximum(m2, tl.minimum(top1, m)), top2)
                top1 = tl.maximum(m, top1)
        t = t.to(tl.int64)
        exact = d == t
        emit = tl.abs(z_d) < float("inf")
        guard = (tl.load(guard_ptr + t) != 0) | (tl.load(guard_ptr + d) != 0)
        in_codebook = tl.zeros((), tl.int32)
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cb = tl.load(codebook_ptr + r * stride_c + offs_c, mask=offs_c < C, other=-1)
            in_codebook |= tl.max(((cb == t) | (cb == d)).to(tl.int32), 0)
        if HAS_REL:
            v = tl.load(rel_ptr + p).to(tl.float32)
        else:
            v = 0.0
        anchor = (v >= thr) | (in_codebook != 0) | guard
        flags = (exact.to(tl.int32) << _F_EXACT) | (emit.to(tl.int32) << _F_EMIT) \
            | (anchor.to(tl.int32) << _F_ANCHOR) | (guard.to(tl.int32) << _F_GUARD)
        if PLAUS:
            plausible = (tl.math.div_rn(z_d - z_t, temp) >= log_ratio) & (n_greater < top_k)
            flags |= plausible.to(tl.int32) << _F_PLAUS
        if ENTROPY:
            y1 = tl.math.div_rn(top1, temp)
            e2 = tl.exp(tl.math.div_rn(top2, temp) - y1)
            e3 = tl.exp(tl.math.div_rn(top3, temp) - y1)
            total = 1.0 + e2 + e3
            p1 = 1.0 / total
            p2 = e2 / total
            p3 = e3 / total
            entropy = -(p1 * tl.log(tl.maximum(p1, 1e-30)) + p2 * tl.log(tl.maximum(p2, 1e-30))
                        + p3 * tl.log(tl.maximum(p3, 1e-30)))
            flags |= (entropy < entropy_gate).to(tl.int32) << _F_LOWENT
        if SEM or W > 0:
            # d_p, d_{p+1}, ..., d_{p+W}, never across the request boundary
            in_req = (p + offs_w < hi) & (offs_w <= W)
            ids = tl.load(draft_ptr + p + offs_w, mask=in_req, other=0).to(tl.int64)
            match = ids == t
            if SEM:
                # cos(E[ids[w]], E[t]) for the whole window at once, each norm clamped to 1e-12
                # like F.cosine_similarity
                dot = tl.zeros([BLOCK_W, BLOCK_H], tl.float32)
                sq = tl.zeros([BLOCK_W, BLOCK_H], tl.float32)
                sq_t = tl.zeros([BLOCK_H], tl.float32)
                for h0 in range(0, H, BLOCK_H):
                    offs_h = h0 + tl.arange(0, BLOCK_H)
                    e_t = tl.load(emb_ptr + t * stride_e + offs_h, mask=offs_h < H, other=0.0)
                    e_t = e_t.to(tl.float32)
                    e = tl.load(emb_ptr + ids[:, None] * stride_e + offs_h[None, :],
                                mask=in_req[:, None] & (offs_h < H)[None, :], other=0.0)
                    e = e.to(tl.float32)
                    dot += e * e_t[None, :]
                    sq += e * e
                    sq_t += e_t * e_t
                norm = tl.maximum(tl.sqrt(tl.sum(sq, 1)), 1e-12)
                norm_t = tl.maximum(tl.sqrt(tl.sum(sq_t, 0)), 1e-12)
                similar = tl.sum(dot, 1) / (norm * norm_t) >= gamma
                match |= similar
            else:
                similar = offs_w < 0  # no semantic rule
            # one reduction packs the semantic bit (w = 0) and the shift matches M[p, 1..W]
            bits = tl.where(offs_w == 0, similar.to(tl.int32) << _F_SEM,
                            (in_req & match).to(tl.int32) << (offs_w + _F_SHIFT - 1))
            flags |= tl.sum(bits, 0)
        tl.store(flags_ptr + p, flags)
        tl.store(argmax_ptr + p, t)
        tl.store(anchor_ptr + p, anchor)

    tl.debug_barrier()

    # -- phase 2: the accepted-prefix scan of rules.accepted_prefix, one position per step ------
    # j is the next undecided position: i < j lies in an accepted shift, i == j is decided now,
    # and after a stop j stays behind i.
    j = tl.zeros((), tl.int32)
    used = tl.zeros((), tl.int32)
    stop = tl.full((), _STOP_NONE, tl.int32)
    for i in range(0, n):
        rule = _REJECTED
        if i < j:  # inside an accepted shift: an inserted token may match its own row
            rule = tl.where((tl.load(flags_ptr + lo + i) >> _F_EXACT) & 1 != 0, _EXACT, _SHIFTED)
        if i == j:
            f = tl.load(flags_ptr + lo + j)
            plausible = (f >> _F_PLAUS) & 1 != 0
            if (f >> _F_EXACT) & 1 != 0:
                rule = _EXACT
                j += 1
            elif (f >> _F_ANCHOR) & 1 != 0:
                stop = tl.where((f >> _F_GUARD) & 1 != 0, _STOP_GUARD, _STOP_ANCHOR)
            elif (f >> _F_EMIT) & 1 == 0:
                stop = _STOP_NO_RULE
            elif (f >> _F_LOWENT) & 1 != 0:
                stop = _STOP_ENTROPY
            elif plausible | ((f >> _F_SEM) & 1 != 0):
                over = False
                if BUDGET:
                    over = used >= budget
                if over:
                    stop = _STOP_BUDGET
                else:
                    rule = tl.where(plausible, _PLAUSIBLE, _SEMANTIC)
                    used += 1
                    j += 1
            else:
                # shift: the first s at which the draft rejoins (M[j, s] and position j+s
                # accepted at its own row) before an inserted token d_{j+1..j+s-1} fails to be
                # a filler (not an anchor, emittable, not low-entropy). Key of offset s: 2s if
                # the draft rejoins there, else 2s+1 if d_{j+s} is no filler (which blocks only
                # longer shifts); the smallest key is the first event. M[j, s] is 0 beyond the
                # window and the request; the mask keeps the loads inside the request.
                ahead = (offs_w >= 1) & (j + offs_w < n)
                g = tl.load(flags_ptr + lo + j + offs_w, mask=ahead, other=0)
                filler = ((g >> _F_ANCHOR) & 1 == 0) & ((g >> _F_EMIT) & 1 != 0) \
                    & ((g >> _F_LOWENT) & 1 == 0)
                g_exact = (g >> _F_EXACT) & 1 != 0
                g_loose = filler & (((g >> _F_PLAUS) | (g >> _F_SEM)) & 1 != 0)
                rejoin = ((f >> (offs_w + _F_SHIFT - 1)) & 1 != 0) & (g_exact | g_loose)
                key = tl.where(ahead & rejoin, 2 * offs_w,
                               tl.where(ahead & ~filler, 2 * offs_w + 1, 2 * BLOCK_W))
                first = tl.min(key, 0)
                shifted = tl.where(first % 2 == 0, first // 2, 0) % BLOCK_W
                # position j is not exact; inserted tokens that match their own row are free
                loose_inserted = 1 + tl.sum((ahead & (offs_w < shifted) & ~g_exact).to(tl.int32), 0)
                over = False
                if BUDGET:  # the rejoining position costs budget too unless it is exact
                    rejoin_exact = (tl.load(flags_ptr + lo + j + shifted) >> _F_EXACT) & 1
                    over = used + loose_inserted + 1 - rejoin_exact > budget
                if shifted == 0:
                    stop = _STOP_NO_RULE
                elif over:
                    stop = _STOP_BUDGET
                else:
                    rule = _SHIFTED
                    used += loose_inserted
                    j += shifted
        tl.store(rule_ptr + lo + i, rule.to(tl.int8))
    tl.store(num_accepted_ptr + r, j)
    tl.store(stop_ptr + r, stop.to(tl.int8))


def verify_triton(draft_token_ids, cu_num_draft_tokens, logits, temperature, relevance,
                  anchor_threshold, codebook, guard_mask, embeddings,
                  params: VerifyParams) -> VerifyResult:
    """``rules.verify_reference`` in one kernel launch for the whole batch (see module doc)."""
    T, V = logits.shape
    B = cu_num_draft_tokens.numel()
    dev = logits.device
    w = params.shift_window if params.shift else 0
    assert w <= MAX_SHIFT_WINDOW, f"shift_window {w} > {MAX_SHIFT_WINDOW}"
    res = VerifyResult(num_accepted=torch.empty(B, dtype=torch.int32, device=dev),
                       rule=torch.empty(T, dtype=torch.int8, device=dev),
                       anchor=torch.empty(T, dtype=torch.bool, device=dev),
                       stop=torch.empty(B, dtype=torch.int8, device=dev),
                       target_argmax=torch.empty(T, dtype=torch.int64, device=dev))
    if B == 0:
        return res
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    semantic = params.semantic and embeddings is not None
    if semantic and embeddings.stride(-1) != 1:
        embeddings = embeddings.contiguous()
    H = embeddings.shape[1] if semantic else 0
    C = codebook.shape[1] if codebook.numel() else 0
    codebook = codebook.contiguous()
    block_w = triton.next_power_of_2(w + 1)
    _verify_prefix_kernel[(B,)](
        draft_token_ids, cu_num_draft_tokens, logits, logits.stride(0), temperature,
        relevance if relevance is not None else temperature,  # not read without HAS_REL
        anchor_threshold, codebook, codebook.stride(0), C, guard_mask,
        embeddings if semantic else logits, embeddings.stride(0) if semantic else 0, H, V,
        torch.empty(T, dtype=torch.int32, device=dev),  # packed flags, phase 1 -> phase 2
        res.num_accepted, res.rule, res.anchor, res.stop, res.target_argmax,
        math.log(params.plausibility_ratio) if params.plausibility else 0.0,
        params.plausibility_top_k, params.semantic_threshold,
        params.entropy_gate if params.entropy_gate is not None else 0.0,
        params.max_loose_per_step if params.max_loose_per_step is not None else 0,
        HAS_REL=relevance is not None, PLAUS=params.plausibility, SEM=semantic,
        ENTROPY=params.entropy_gate is not None, BUDGET=params.max_loose_per_step is not None,
        W=w, BLOCK_W=block_w, BLOCK_V=min(4096, triton.next_power_of_2(V)), BLOCK_C=16,
        BLOCK_H=min(triton.next_power_of_2(max(H, 1)), 4096 // block_w))
    return res
