"""Positions of the draft's first pass, in the layout vLLM's draft-model proposer builds.

vLLM copies the target's scheduled tokens into the drafter's buffers and gives every request
``slots`` extra positions after them (its sampled token): request r's tokens move from
``qsl[r] + j`` to ``qsl[r] + r * slots + j`` and the request owns ``n_r + slots`` of them. Sequence
positions continue one by one; vLLM's copy kernel computes them, and the KV slots from them.

An M-RoPE draft of the target's family needs the target's 3-row M-RoPE positions instead: the same
rows at the same sequence positions (same processor, same rules), and past the last scheduled
token, generated text, whose three rows advance together by one per token.
"""

from __future__ import annotations

import torch


def draft_mrope_positions(target_mrope: torch.Tensor, query_start_loc: torch.Tensor,
                          slots: int, num_out: int) -> torch.Tensor:
    """[3, num_out] M-RoPE positions of the draft's first-pass tokens.

    target_mrope: [3, N] the target's positions of its N scheduled tokens;
    query_start_loc: [B + 1] the target's layout; slots: extra positions per request.
    """
    device = target_mrope.device
    qsl = query_start_loc.to(device=device, dtype=torch.long)
    n = qsl[1:] - qsl[:-1]
    batch = n.numel()
    req = torch.repeat_interleave(torch.arange(batch, device=device), n + slots,
                                  output_size=num_out)
    j = torch.arange(num_out, device=device) - qsl[req] - req * slots
    last = n[req] - 1
    src = qsl[req] + torch.minimum(j, last)
    beyond = (j - last).clamp(min=0)
    return target_mrope[:, src] + beyond


def sequence_positions(query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                       num_tokens: int) -> torch.Tensor:
    """[num_tokens] sequence positions of a step's scheduled tokens, from its attention metadata.

    Request r's tokens ``qsl[r]:qsl[r + 1]`` end at position ``seq_lens[r] - 1``. Tokens past
    ``qsl[-1]`` (padding) get the last request's continuation. No host sync.
    """
    qsl = query_start_loc.to(torch.long)
    t = torch.arange(num_tokens, device=qsl.device)
    req = torch.searchsorted(qsl[1:], t, right=True).clamp(max=qsl.numel() - 2)
    first = seq_lens.to(device=qsl.device, dtype=torch.long) - (qsl[1:] - qsl[:-1])
    return first[req] + t - qsl[req]
