"""LVSpecDrafter: the draft proposer LVSpec installs in the V1 model runner.

This release drafts like vLLM's ``draft_model`` method (a text-only draft with the target's
vocabulary, its own KV cache, drafting greedily). It is its own class so that the runner's
``isinstance`` checks keep routing it through the draft-model path, and so the video-aware
drafting of the method (a same-family vision-language draft with M-RoPE, SpecVLM pruning) has one
place to live without touching vLLM's proposer.
"""

from __future__ import annotations

from vllm.v1.spec_decode.draft_model import DraftModelProposer


class LVSpecDrafter(DraftModelProposer):
    pass
