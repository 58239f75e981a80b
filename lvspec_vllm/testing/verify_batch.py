"""Synthetic verify steps for the sampler tests and the verify-step benchmark.

Builds what vLLM's V1 runner hands the rejection sampler (SpecDecodeMetadata, SamplingMetadata)
and the few runner attributes LVSpecRejectionSampler reads, without an engine.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch


def spec_metadata(drafts: list[list[int]], device="cpu"):
    """vLLM's layout: request i owns len(drafts[i]) target rows, then its bonus row."""
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    target, bonus, start = [], [], 0
    for d in drafts:
        target += list(range(start, start + len(d)))
        bonus.append(start + len(d))
        start += len(d) + 1
    num = [len(d) for d in drafts]
    i32 = dict(dtype=torch.int32, device=device)
    return SpecDecodeMetadata(
        draft_token_ids=torch.tensor(sum(drafts, []), **i32), num_draft_tokens=num,
        cu_num_draft_tokens=torch.tensor(num).cumsum(0).to(**i32),
        cu_num_sampled_tokens=(torch.tensor(num) + 1).cumsum(0).to(**i32),
        target_logits_indices=torch.tensor(target, **i32),
        bonus_logits_indices=torch.tensor(bonus, **i32),
        logits_indices=torch.arange(start, **i32))


def sampling_metadata(temperature: list[float], logprobs: int | None = None, device="cpu"):
    """Temperature 0 marks a greedy request, as in vLLM's input batch."""
    from vllm.v1.sample.logits_processor import LogitsProcessors
    from vllm.v1.sample.metadata import SamplingMetadata

    B = len(temperature)
    greedy = all(x == 0 for x in temperature)
    zeros = torch.zeros(B, device=device)
    return SamplingMetadata(
        temperature=None if greedy else torch.tensor(temperature, device=device),
        all_greedy=greedy, all_random=all(x > 0 for x in temperature), top_p=None, top_k=None,
        generators={}, max_num_logprobs=logprobs, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=zeros, presence_penalties=zeros,
        repetition_penalties=torch.ones(B, device=device),
        output_token_ids=[[] for _ in range(B)], allowed_token_ids_mask=None,
        bad_words_token_ids={}, logitsprocs=LogitsProcessors())


def fake_runner(req_ids: list[str], visual: list[bool], tokenizer: str | None = None,
                stop_token_ids: set[int] = frozenset()):
    """The runner attributes the sampler reads: batch order, request state, tokenizer path."""
    requests = {r: SimpleNamespace(mm_features=["video"] if v else [],
                                   sampling_params=SimpleNamespace(
                                       all_stop_token_ids=set(stop_token_ids)))
                for r, v in zip(req_ids, visual)}
    return SimpleNamespace(input_batch=SimpleNamespace(req_ids=list(req_ids)), requests=requests,
                           model_config=SimpleNamespace(tokenizer=tokenizer,
                                                        trust_remote_code=False))
