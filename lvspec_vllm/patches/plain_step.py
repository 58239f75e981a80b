"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._update_states`` (vLLM 0.32, 0.33).

Why: vLLM 0.32's runner takes its speculative path in every step of an engine with a
speculative config, whether the step drafts or not: it builds spec-decode metadata, attention
metadata for the drafter, calls the rejection sampler instead of the sampler, calls the drafter
and copies its empty drafts to the host. In a step that verifies no drafts and in which LVSpec's
draft runs no forward, none of it is needed: at k = 0 when every decoding request defers its
pass (``drafter/lag.py``) or the schedule never drafts, and at k > 0 when every row of the step
is cold (``drafter/cold.py``: an ``auto_k`` exploration that admitted nobody). On the 2-core CPU
it was most of what a speculative engine's k = 0 step costs over a plain engine's
(docs/benchmarks.md). vLLM's runner before 0.32 took its plain path in such a step; this
post-hook restores that. Once ``_update_states`` has laid out the step's batch, it asks the
drafter (``LVSpecDrafter.begin_plain_step``, which plans the step once); if no draft forward is
due, the runner's ``speculative_config`` reads None until the step's ``sample_tokens`` returns,
so vLLM's own code takes its plain path (its sampler, no drafter). ``end`` (called by the
``sample_tokens`` patch, ``runner_output.py``) restores it and lets the drafter record the
step's deferred tokens. Outputs are the same tokens; only the bookkeeping goes. (The runner
reads the step's k only in the drafter's call, which a plain step does not make; the scheduler
gets no drafts back, as from a step whose rows are all cold.)

Only where the plain path is the same computation: without async scheduling (the next step's
inputs come from the host), a single pipeline stage and data-parallel rank (no collective the
other ranks would wait on), no KV or encoder-cache transfer, and attention-only models (vLLM
gives recurrent backends a zero-draft speculative layout). With ``"plain_k0_steps": false`` every
step takes vLLM's speculative path.
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch

_HIDDEN = "_lvspec_plain_step"  # runner.__dict__: (speculative_config, step's tokens)
_ELIGIBLE = "_lvspec_plain_eligible"


def _eligible(runner) -> bool:
    ok = runner.__dict__.get(_ELIGIBLE)
    if ok is None:
        config = runner.vllm_config
        parallel = config.parallel_config
        model = runner.model_config
        ok = bool(getattr(getattr(runner, "drafter", None), "plain_steps", False)
                  and not runner.use_async_scheduling
                  and parallel.pipeline_parallel_size == 1
                  and parallel.data_parallel_size == 1
                  and config.kv_transfer_config is None
                  and getattr(config, "ec_transfer_config", None) is None
                  and not model.is_hybrid and not model.is_attention_free)
        runner.__dict__[_ELIGIBLE] = ok
    return ok


def end(runner) -> bool:
    """After a step's ``sample_tokens``: if it was a plain step, restore the speculative config,
    let the drafter record the step, and return True."""
    hidden = runner.__dict__.pop(_HIDDEN, None)
    if hidden is None:
        return False
    runner.speculative_config, num_tokens = hidden
    # No drafts for the scheduler to take after it (the engine core asks after a step at
    # k > 0): without this, the runner would hand back an earlier step's drafts again.
    runner._draft_token_req_ids = None
    runner.drafter.end_plain_step(runner.input_ids.gpu[:num_tokens])
    return True


class UpdateStatesPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "_update_states"

    @staticmethod
    def wrapper(original, self, scheduler_output):
        hidden = self.__dict__.pop(_HIDDEN, None)
        if hidden is not None:  # a plain step that never reached sample_tokens
            self.speculative_config = hidden[0]
        out = original(self, scheduler_output)
        n = scheduler_output.total_num_scheduled_tokens
        if n and not any(scheduler_output.scheduled_spec_decode_tokens.values()) \
                and _eligible(self):
            batch = self.input_batch.num_reqs
            qsl = [0]
            for req_id in self.input_batch.req_ids[:batch]:
                qsl.append(qsl[-1] + scheduler_output.num_scheduled_tokens[req_id])
            if self.drafter.begin_plain_step(batch, qsl,
                                             scheduler_output.num_spec_tokens_to_schedule):
                self.__dict__[_HIDDEN] = (self.speculative_config, n)
                self.speculative_config = None
        return out
