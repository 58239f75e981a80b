"""LVSpecDrafter: the draft proposer LVSpec installs in the V1 model runner.

This release drafts like vLLM's ``draft_model`` method (a text-only draft with the target's
vocabulary, its own KV cache, drafting greedily). It is its own class so that the runner's
``isinstance`` checks keep routing it through the draft-model path, and so the video-aware
drafting of the method (a same-family vision-language draft with M-RoPE, SpecVLM pruning) has one
place to live without touching vLLM's proposer.

The per-step k comes from vLLM's scheduler (``num_speculative_tokens_per_batch_size``). At k = 0
vLLM's proposer still runs one draft forward over the step's new tokens so that the draft's KV
cache stays complete for later steps that do draft; when the schedule is 0 at every batch size
no step ever drafts, and that pass is skipped too.
"""

from __future__ import annotations

import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

DRAFTER_COUNTERS = ("propose_calls", "drafting_passes", "kv_sync_passes", "skipped_passes",
                    "proposed_tokens")


class LVSpecDrafter(DraftModelProposer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        schedule = self.speculative_config.num_speculative_tokens_per_batch_size
        self.never_drafts = bool(schedule) and max(entry[-1] for entry in schedule) == 0
        self.counts = dict.fromkeys(DRAFTER_COUNTERS, 0)

    def propose(self, num_speculative_tokens, *args, **kwargs):
        c = self.counts
        c["propose_calls"] += 1
        cad = kwargs.get("common_attn_metadata")
        if num_speculative_tokens == 0:
            if self.never_drafts:
                c["skipped_passes"] += 1
                self._last_draft_probs = None
                return torch.empty(cad.batch_size(), 0, dtype=torch.int64,
                                   device=self.device)
            c["kv_sync_passes"] += 1
        else:
            c["drafting_passes"] += 1
            c["proposed_tokens"] += num_speculative_tokens * cad.batch_size()
        return super().propose(num_speculative_tokens, *args, **kwargs)
