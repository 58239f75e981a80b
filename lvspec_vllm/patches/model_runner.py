"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.__init__`` (vLLM 0.32, 0.33).

Why: vLLM has no registry for proposers or rejection samplers. The V1 runner builds both in
``__init__`` (``self.drafter = DraftModelProposer(...)`` and ``self.rejection_sampler =
RejectionSampler(self.sampler, speculative_config, device)``); after it returns, this post-hook
swaps in LVSpec's subclasses when ``additional_config["lvspec"]`` is present. The CPU runner
subclasses GPUModelRunner and calls this ``__init__``, so one patch covers CUDA and CPU. Nothing
is loaded yet at that point (models load in ``load_model``), so the swap costs only the
constructor of the replaced objects.
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch


class ModelRunnerInitPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "__init__"

    @staticmethod
    def wrapper(original, self, vllm_config, *args, **kwargs):
        original(self, vllm_config, *args, **kwargs)
        options = (vllm_config.additional_config or {}).get("lvspec") \
            if isinstance(vllm_config.additional_config, dict) else None
        if options is None or not hasattr(self, "rejection_sampler"):
            return  # not LVSpec, or not the last pipeline stage (no drafter there)
        from lvspec_vllm.drafter import LVSpecDrafter
        from lvspec_vllm.sampler import LVSpecRejectionSampler
        from lvspec_vllm.config import LVSpecConfig

        config = LVSpecConfig.from_dict(options)
        self.drafter = LVSpecDrafter(vllm_config=self.vllm_config, device=self.device, runner=self)
        capture = None
        if config.needs_relevance():
            from lvspec_vllm.patches import attention
            from lvspec_vllm.relevance.capture import RelevanceCapture

            capture = RelevanceCapture(self, {})
            load_model = self.load_model  # the CPU runner overrides it: wrap the instance's

            def load_and_capture(*args, **kwargs):
                load_model(*args, **kwargs)
                attention.install(self, capture, config.relevance_layers)

            self.load_model = load_and_capture
        self.rejection_sampler = LVSpecRejectionSampler(
            self.sampler, self.speculative_config, self.device, config, runner=self,
            relevance=capture)
