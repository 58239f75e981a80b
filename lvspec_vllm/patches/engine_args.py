"""Patch: ``vllm.engine.arg_utils.EngineArgs.create_speculative_config`` (vLLM 0.32, 0.33).

Why: vLLM's SpeculativeConfig is a pydantic dataclass with a Literal ``method`` and
``extra="forbid"``, so ``{"method": "lvspec", ...}`` is refused before any plugin code runs inside
it. ``vllm serve``, ``vllm.LLM`` and ``vllm bench`` all build it through this one method, in the
API process, before VllmConfig exists. Here the LVSpec keys are split off and validated, the
method becomes vLLM's own ``draft_model``, and the options travel to every worker in
``additional_config["lvspec"]`` (part of the config hash, pickled to each rank).

``--spec-method/--spec-model/--spec-tokens`` are merged into the dict inside the original method;
the wrapper reads them too, so ``--spec-method lvspec`` works the same way.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from lvspec_vllm.config import MAX_SPECULATIVE_TOKENS, LVSpecConfig, LVSpecConfigError
from lvspec_vllm.patches import Patch

METHOD = "lvspec"
_ANY_BATCH = 1 << 20


def _vllm_spec_keys() -> set[str]:
    from vllm.config import SpeculativeConfig

    return {f.name for f in dataclasses.fields(SpeculativeConfig)}


def translate(spec: dict[str, Any], spec_method: str | None = None,
              spec_model: str | None = None, spec_tokens: int | None = None,
              ) -> tuple[dict[str, Any], LVSpecConfig] | None:
    """Split an ``"lvspec"`` speculative config into vLLM's part and a validated LVSpecConfig.

    Returns None when the config is not for LVSpec. The ``spec_*`` arguments are the CLI
    shorthands, which vLLM merges into the dict later.
    """
    spec = {k.replace("-", "_"): v for k, v in (spec or {}).items()}
    if spec.get("method", spec_method) != METHOD:
        return None
    vllm_keys = _vllm_spec_keys()
    lv_keys = set(LVSpecConfig.keys())
    lv_options = {k: spec.pop(k) for k in list(spec) if k in lv_keys}
    unknown = sorted(k for k in spec if k not in vllm_keys)
    if unknown:
        raise LVSpecConfigError(
            f"unknown speculative_config key {unknown[0]!r} for method 'lvspec'. Allowed LVSpec "
            f"keys: {', '.join(sorted(lv_keys))}; vLLM's keys: {', '.join(sorted(vllm_keys))}.")
    if spec.get("model", spec_model) is None:
        raise LVSpecConfigError(
            "method 'lvspec' needs a draft model: set \"model\" in --speculative-config (or "
            "--spec-model) to a small checkpoint of the target's family, e.g. "
            "Qwen/Qwen2.5-7B-Instruct for Qwen/Qwen2.5-VL-32B-Instruct.")
    k = spec.get("num_speculative_tokens", spec_tokens)
    if k is None or isinstance(k, bool) or not isinstance(k, int) or \
            not 1 <= k <= MAX_SPECULATIVE_TOKENS:
        raise LVSpecConfigError(
            f"method 'lvspec' needs \"num_speculative_tokens\" as an integer in "
            f"[1, {MAX_SPECULATIVE_TOKENS}], got {k!r}.")
    if "method" in spec:
        spec["method"] = "draft_model"
    config = LVSpecConfig.from_dict(lv_options)
    if config.auto_k:
        if spec.get("num_speculative_tokens_per_batch_size"):
            raise LVSpecConfigError(
                "'auto_k': true chooses k per step itself; remove "
                "\"num_speculative_tokens_per_batch_size\" or set 'auto_k': false.")
        # vLLM's per-batch-size k table, which the auto-k controller rewrites every step
        spec["num_speculative_tokens_per_batch_size"] = [[1, _ANY_BATCH, k]]
    if config.draft_cold_requests:
        schedule = spec.get("num_speculative_tokens_per_batch_size") or []
        if not config.draft_catch_up:
            raise LVSpecConfigError("'draft_cold_requests': true skips the draft for requests "
                                    "admitted at k = 0 and needs 'draft_catch_up': true.")
        if not config.auto_k and not any(entry[-1] == 0 for entry in schedule):
            raise LVSpecConfigError(
                "'draft_cold_requests': true acts on requests admitted at k = 0, which only "
                "'auto_k': true or a \"num_speculative_tokens_per_batch_size\" entry with k = 0 "
                "gives; add one or set 'draft_cold_requests': false.")
    return spec, config


def _check_combination(engine_args: Any, spec_config: Any, lv_config: LVSpecConfig) -> None:
    """Refuse what this release cannot run, in the API process, with the fix in the message."""
    if lv_config.loose and str(engine_args.logprobs_mode).startswith("processed"):
        raise LVSpecConfigError(
            f"--logprobs-mode {engine_args.logprobs_mode} would report logprobs from the logits "
            f"LVSpec rewrites to encode loose accepts. Use raw_logprobs or raw_logits, or "
            f"strict verification.")
    # what reads the target's attention, and how to turn it off
    if lv_config.needs_relevance():
        who, off = ("loose verification with 'anchor_identification'",
                    "set 'anchor_identification': false")
    else:
        who, off = "'draft_pruning'", "set 'draft_pruning': false"
    if lv_config.captures_attention() and engine_args.enable_prefix_caching is not False:
        raise LVSpecConfigError(
            f"{who} reads the target's attention on the video tokens, which prefix caching "
            f"would skip: start vLLM with --no-enable-prefix-caching (vllm.LLM: "
            f"enable_prefix_caching=False), or {off}.")
    if lv_config.captures_attention() and _full_cuda_graphs_possible(engine_args):
        raise LVSpecConfigError(
            f"{who} captures the target's attention from Python at the attention call, which "
            f"full CUDA graphs replay without: start vLLM with --compilation-config "
            f"'{{\"cudagraph_mode\": \"PIECEWISE\"}}' or --enforce-eager, or {off}.")
    draft = spec_config.draft_model_config
    if lv_config.draft_pruning and (draft is None or not draft.is_multimodal_model):
        raise LVSpecConfigError(
            "LVSpec option 'draft_pruning' prunes the video tokens a video-aware draft sees; "
            f"the draft {getattr(draft, 'model', None)!r} is text-only. Use a draft of the "
            "target's family that takes videos, or set 'draft_pruning': false.")
    if draft is not None and draft.is_multimodal_model:
        from lvspec_vllm.drafter.compat import vl_draft_problem

        problem = vl_draft_problem(spec_config.target_model_config.hf_config, draft.hf_config)
        if problem:
            raise LVSpecConfigError(f"LVSpec draft {draft.model!r} {problem}")


def _full_cuda_graphs_possible(engine_args: Any) -> bool:
    from vllm.platforms import current_platform

    if not current_platform.is_cuda_alike() or engine_args.enforce_eager:
        return False
    mode = getattr(engine_args.compilation_config, "cudagraph_mode", None)
    return mode is None or mode.name not in ("NONE", "PIECEWISE")  # vLLM's default has FULL


class CreateSpeculativeConfigPatch(Patch):
    target_module = "vllm.engine.arg_utils"
    target_owner = "EngineArgs"
    target_attr = "create_speculative_config"

    @staticmethod
    def wrapper(original, self, *args, **kwargs):
        result = translate(self.speculative_config or {}, self.spec_method, self.spec_model,
                           self.spec_tokens)
        if result is None:
            return original(self, *args, **kwargs)
        vllm_spec, lv_config = result
        if self.spec_method == METHOD:
            self.spec_method = "draft_model"
        self.speculative_config = vllm_spec
        # LVSpec hooks the V1 model runner, the one runner CUDA and CPU share; vLLM's worker
        # processes inherit this environment.
        if os.environ.get("VLLM_USE_V2_MODEL_RUNNER", "0") not in ("0", "false", "False"):
            raise LVSpecConfigError("method 'lvspec' runs on vLLM's V1 model runner; unset "
                                    "VLLM_USE_V2_MODEL_RUNNER or set it to 0.")
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        self.additional_config = {**(self.additional_config or {}), "lvspec": lv_config.to_dict()}
        from lvspec_vllm.metrics import install_collector

        install_collector()  # this is the API process: /metrics is served from here
        spec_config = original(self, *args, **kwargs)
        _check_combination(self, spec_config, lv_config)
        return spec_config
