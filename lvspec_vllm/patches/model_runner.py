"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner.__init__`` (vLLM 0.32, 0.33).

Why: vLLM has no registry for proposers or rejection samplers. The V1 runner builds both in
``__init__`` (``self.drafter = DraftModelProposer(...)`` and ``self.rejection_sampler =
RejectionSampler(self.sampler, speculative_config, device)``). When ``additional_config["lvspec"]``
is present, the runner module's name ``DraftModelProposer`` points at LVSpec's subclass for the
duration of that ``__init__`` (vLLM's own constructor refuses the M-RoPE drafts LVSpec supports, so
it must not run first), and after it returns the rejection sampler is replaced. The CPU runner
subclasses GPUModelRunner and calls this ``__init__``, so one patch covers CUDA and CPU. The
drafter's options (deferred k = 0 passes, pruning) are switched on here too, once both exist. Nothing
is loaded yet at that point (models load in ``load_model``).
"""

from __future__ import annotations

from lvspec_vllm.patches import Patch


class ModelRunnerInitPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "__init__"

    @staticmethod
    def wrapper(original, self, vllm_config, *args, **kwargs):
        options = (vllm_config.additional_config or {}).get("lvspec") \
            if isinstance(vllm_config.additional_config, dict) else None
        if options is None:
            return original(self, vllm_config, *args, **kwargs)
        import vllm.v1.worker.gpu_model_runner as runner_module
        from lvspec_vllm.drafter import LVSpecDrafter

        vllm_proposer = runner_module.DraftModelProposer
        runner_module.DraftModelProposer = LVSpecDrafter
        try:
            original(self, vllm_config, *args, **kwargs)
        finally:
            runner_module.DraftModelProposer = vllm_proposer
        if not hasattr(self, "rejection_sampler"):
            return  # not the last pipeline stage: no drafter, no sampler here
        from lvspec_vllm.config import LVSpecConfig
        from lvspec_vllm.sampler import LVSpecRejectionSampler

        config = LVSpecConfig.from_dict(options)
        if not isinstance(self.drafter, LVSpecDrafter):
            raise RuntimeError(f"LVSpec: vLLM built a {type(self.drafter).__name__} drafter, "
                               f"expected its draft_model proposer")
        capture = None
        # a schedule that never drafts verifies nothing: no attention to capture
        if config.captures_attention() and not self.drafter.never_drafts:
            from lvspec_vllm.patches import attention
            from lvspec_vllm.relevance.capture import RelevanceCapture

            capture = RelevanceCapture(self, {}, masses=config.needs_relevance(),
                                       prompt_scores=config.draft_pruning)
            load_model = self.load_model  # the CPU runner overrides it: wrap the instance's

            def load_and_capture(*args, **kwargs):
                load_model(*args, **kwargs)
                attention.install(self, capture, config.relevance_layers)

            self.load_model = load_and_capture
        schedule = self.speculative_config.num_speculative_tokens_per_batch_size or []
        if config.draft_catch_up and (config.auto_k or any(e[-1] == 0 for e in schedule)):
            self.drafter.enable_catch_up()
        self.drafter.plain_steps = config.plain_k0_steps  # patches/plain_step.py
        if config.draft_cold_requests:
            if self.use_async_scheduling:
                raise RuntimeError(
                    "LVSpec 'draft_cold_requests' needs vLLM without async scheduling (the "
                    "runner feeds its drafts to the next step itself there): start vLLM with "
                    "--no-async-scheduling, or set 'draft_cold_requests': false.")
            self.drafter.enable_cold_requests()
            if config.auto_k:  # it prices the draft's prefill from the drafter's own clock
                self.drafter.enable_pass_timing()
        if config.draft_pruning:
            self.drafter.enable_pruning(config.draft_keep_ratio, config.draft_stage1_share,
                                        capture)
        self.rejection_sampler = LVSpecRejectionSampler(
            self.sampler, self.speculative_config, self.device, config, runner=self,
            relevance=capture)
