"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.take_draft_token_ids`` (vLLM 0.32,
0.33).

Why: the draft-model path hands the scheduler one k-wide draft row per request, and the scheduler
verifies every draft it is given. With ``draft_cold_requests`` the draft never runs for a cold
request (``drafter/cold.py``), so its row is a placeholder. This hook empties those requests'
lists on their way out of the worker, and the scheduler schedules them without drafts, as it
does a request whose drafts a grammar rejected. Other requests' drafts pass unchanged.

Only without async scheduling: there the runner feeds its draft tensor to the next step itself,
and ``patches/model_runner.py`` refuses the option at startup.
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch


class TakeDraftTokenIdsPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "take_draft_token_ids"

    @staticmethod
    def wrapper(original, self):
        out = original(self)
        cold = getattr(getattr(self, "drafter", None), "cold_request_ids", None)
        if out is None or not cold:
            return out
        for i, req_id in enumerate(out.req_ids):
            if req_id in cold:
                out.draft_token_ids[i] = []
        return out
