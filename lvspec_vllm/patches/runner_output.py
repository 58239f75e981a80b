"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.sample_tokens`` (vLLM 0.32, 0.33).

Why: with ``auto_k`` and ``draft_cold_requests`` the controller prices the draft's prefill of
every request it admits at k > 0 (``auto_k.DraftPassCost``). Engine step times cannot measure
it at one request: there every prefill step follows an idle engine. The drafter times its own
passes in the worker, and the controller runs in the scheduler; the step's ``ModelRunnerOutput``
is the one object that travels between them every step (in-process as it is, across processes
pickled with its attributes). This post-hook attaches the passes timed since the last step as
``DRAFT_PASSES``, which the scheduler's hook (``scheduler.py``) reads. vLLM's own fields and
the shared empty output are left alone; with async scheduling, which cold requests do not
support, the output is not a ``ModelRunnerOutput`` and nothing is attached.

The same post-hook ends a plain step (``plain_step.py``): the runner's speculative config comes
back, and the drafter records the step, before the passes are taken.
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch, plain_step

DRAFT_PASSES = "_lvspec_draft_passes"


def draft_passes(model_runner_output) -> list[tuple]:
    """The drafter's timed passes that a step's output carries (``take_timed_passes``)."""
    return getattr(model_runner_output, "__dict__", {}).get(DRAFT_PASSES) or []


class SampleTokensPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "sample_tokens"

    @staticmethod
    def wrapper(original, self, *args, **kwargs):
        try:
            out = original(self, *args, **kwargs)
        finally:
            plain_step.end(self)
        take = getattr(getattr(self, "drafter", None), "take_timed_passes", None)
        if take is None:
            return out
        from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput

        if type(out) is ModelRunnerOutput and out is not EMPTY_MODEL_RUNNER_OUTPUT:
            passes = take()
            if passes:
                out.__dict__[DRAFT_PASSES] = passes
        return out
