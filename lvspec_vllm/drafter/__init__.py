"""The drafter: vLLM's draft-model proposer, k from the scheduler, and a draft that sees the video.

    proposer.py   LVSpecDrafter, installed in the V1 model runner by patches/model_runner.py
    compat.py     which vision-language drafts fit which targets (checked at startup)
    vision.py     the draft's own encoder cache and its embeddings at the placeholder tokens
    positions.py  M-RoPE positions of the draft's first pass
    pruning.py    SpecVLM: which video tokens the draft keeps, and its compacted layout
"""

from lvspec_vllm.drafter.proposer import DRAFTER_COUNTERS, LVSpecDrafter

__all__ = ["DRAFTER_COUNTERS", "LVSpecDrafter"]
