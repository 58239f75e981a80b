"""Patch: ``vllm.v1.engine.core.EngineCore.post_step`` (vLLM 0.32, 0.33).

Why: without async scheduling (always on the CPU backend), the engine core asks the worker for
the step's drafts after every step (``take_draft_token_ids``: one round trip through the
executor's message queues, both sides spinning). After a step scheduled with k = 0 the drafter
proposed nothing, and the scheduler already cleared the drafts of every request it scheduled,
so the answer can only restate that: the round trip is all the cost. On the 2-core CPU machine
it was the largest part of what a speculative engine whose drafter never runs costs over no
speculation (docs/benchmarks.md). This hook skips it after a k = 0 step of an LVSpec engine;
otherwise, and with a batch queue (pipeline parallelism) where the last step finished need not
be the last one scheduled, vLLM's ``post_step`` runs unchanged. With async scheduling vLLM
makes no round trip here at all.
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch
from lvspec_vllm.patches.scheduler import last_step_k


class EngineCorePostStepPatch(Patch):
    target_module = "vllm.v1.engine.core"
    target_owner = "EngineCore"
    target_attr = "post_step"

    @staticmethod
    def wrapper(original, self, model_executed):
        if model_executed and getattr(self, "batch_queue", None) is None \
                and last_step_k(self.scheduler) == 0:
            return None  # the drafter proposed nothing: no drafts to fetch
        return original(self, model_executed)
