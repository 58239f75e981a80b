"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.propose_draft_token_ids`` (vLLM 0.32,
0.33).

Why: with a speculative config, vLLM prepares the drafter's inputs in every step, whatever k
the step drafts: the next tokens from the sampled ones, the padded first-pass layout and, for a
drafter with multimodal inputs, the step's encoder outputs, before it calls the proposer. In a
k = 0 step in which LVSpec's drafter runs no forward (the schedule never drafts, or every
decoding request defers its pass, ``drafter/lag.py``) nothing reads them. On the CPU backend
those are emulated Triton kernels, and a profile put this preparation at about a third of what
a speculative engine whose draft never runs costs over no speculation (docs/benchmarks.md). The
hook asks the drafter first (``LVSpecDrafter.propose_without_inputs``, which records the waiting
rows' tokens) and returns its empty drafts; otherwise vLLM's method runs unchanged.

Only without async scheduling: there the same method also publishes the valid sampled-token
counts that the next step's input preparation waits for. Where a plain step applies
(``plain_step.py``) such a step never reaches this method: it covers ``"plain_k0_steps": false``
and the setups plain steps leave out.
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch


class ProposeDraftTokenIdsPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "propose_draft_token_ids"

    @staticmethod
    def wrapper(original, self, scheduler_output, *args, **kwargs):
        skip = getattr(getattr(self, "drafter", None), "propose_without_inputs", None)
        if skip is not None and not self.use_async_scheduling:
            batch = self.input_batch.num_reqs
            n = scheduler_output.total_num_scheduled_tokens
            drafts = skip(scheduler_output.num_spec_tokens_to_schedule, batch,
                          self.query_start_loc.np[:batch + 1].tolist(),
                          lambda: self.input_ids.gpu[:n])
            if drafts is not None:
                return drafts
        return original(self, scheduler_output, *args, **kwargs)
