"""LVSpecRejectionSampler: vLLM's rejection sampler with LVSpec's verification in front of it.

vLLM's ``RejectionSampler.forward`` changes every release, so it is never copied: LVSpec decides
which draft positions to accept, encodes the decisions into vLLM's own inputs (the way vLLM 0.33's
FLy verifier does: greedy rows see the accepted draft as the target's argmax, random rows get a
zero uniform draw) and lets ``super().forward`` produce the tokens. That keeps the scheduler's
invariant by construction: emitted tokens are a prefix of the draft plus one target token.

Verification is strict in this release (``loose`` is refused at startup), so there is nothing to
encode and the output is exactly vLLM's: greedy decoding stays token-for-token the target's.
"""

from __future__ import annotations

import torch
from lvspec_vllm._logging import get_logger
from vllm.v1.sample.rejection_sampler import PLACEHOLDER_TOKEN_ID, RejectionSampler

from lvspec_vllm.config import LVSpecConfig

logger = get_logger(__name__)


class LVSpecRejectionSampler(RejectionSampler):
    def __init__(self, sampler, spec_config, device, lvspec_config: LVSpecConfig):
        super().__init__(sampler, spec_config, device)
        self.lvspec_config = lvspec_config
        # [verify steps, draft tokens, accepted draft tokens], kept on the device: no host sync
        # on the verify path.
        self.counts = torch.zeros(3, dtype=torch.int64, device=device)
        logger.info("LVSpec rejection sampler installed (verification: %s)",
                    lvspec_config.describe())

    def forward(self, metadata, draft_probs, logits, sampling_metadata):
        output = super().forward(metadata, draft_probs, logits, sampling_metadata)
        emitted = (output.sampled_token_ids != PLACEHOLDER_TOKEN_ID).sum()
        num_reqs = output.sampled_token_ids.shape[0]
        self.counts += torch.stack([
            torch.ones((), dtype=torch.int64, device=self.counts.device),
            torch.tensor(metadata.draft_token_ids.numel(), device=self.counts.device),
            (emitted - num_reqs).to(torch.int64),
        ])
        return output


def worker_report(worker) -> dict:
    """What LVSpec installed in one worker and what it verified; for ``LLM.collective_rpc``."""
    from vllm.distributed import get_tensor_model_parallel_rank

    runner = worker.model_runner
    sampler = getattr(runner, "rejection_sampler", None)
    counts = sampler.counts.tolist() if isinstance(sampler, LVSpecRejectionSampler) else None
    return {
        "tp_rank": get_tensor_model_parallel_rank(),
        "drafter": type(getattr(runner, "drafter", None)).__name__,
        "rejection_sampler": type(sampler).__name__,
        "verify_steps": counts[0] if counts else None,
        "draft_tokens": counts[1] if counts else None,
        "accepted_tokens": counts[2] if counts else None,
    }
