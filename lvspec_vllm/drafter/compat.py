"""Which vision-language drafts can see the video, checked once at startup.

A video-aware draft runs its own vision encoder on the pixels the *target's* processor made, and
places the result at the target's placeholder tokens: so the draft must be the target's family
(same architecture) and agree on everything that decides the pixel layout and the number of
visual tokens. Anything else is refused with the key that differs and both values.
"""

from __future__ import annotations

from typing import Any

# architecture -> (vision_config keys, top-level config keys) that must match the target's
SUPPORTED_VL_DRAFTS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Qwen2_5_VLForConditionalGeneration": (
        ("patch_size", "temporal_patch_size", "spatial_merge_size", "in_channels",
         "tokens_per_second"),
        ("image_token_id", "video_token_id", "vision_start_token_id")),
    "LlavaOnevisionForConditionalGeneration": (
        ("image_size", "patch_size", "num_channels"),
        ("image_token_index", "video_token_index", "image_grid_pinpoints",
         "vision_aspect_ratio", "vision_feature_select_strategy")),
}


def _arch(hf_config: Any) -> str:
    return (getattr(hf_config, "architectures", None) or ["?"])[0]


def vl_draft_problem(target_hf_config: Any, draft_hf_config: Any) -> str | None:
    """Why this vision-language draft cannot draft for this target, or None if it can."""
    arch, target_arch = _arch(draft_hf_config), _arch(target_hf_config)
    if arch not in SUPPORTED_VL_DRAFTS:
        return (f"is a vision-language model ({arch}) that LVSpec cannot run on the video; "
                f"supported vision-language drafts: {', '.join(SUPPORTED_VL_DRAFTS)}. Or use a "
                f"text-only draft of the target's family (its language model alone).")
    if arch != target_arch:
        return (f"is a {arch} but the target is a {target_arch}: a video-aware draft must be "
                f"the target's own family (it reads the target's preprocessed pixels).")
    vision_keys, top_keys = SUPPORTED_VL_DRAFTS[arch]
    pairs = [(f"vision_config.{k}", getattr(target_hf_config.vision_config, k, None),
              getattr(draft_hf_config.vision_config, k, None)) for k in vision_keys]
    pairs += [(k, getattr(target_hf_config, k, None), getattr(draft_hf_config, k, None))
              for k in top_keys]
    for key, t, d in pairs:
        if t != d:
            return (f"differs from the target in {key} (draft {d!r}, target {t!r}): the draft "
                    f"would see other visual tokens than the target's placeholders hold.")
    return None


# vLLM proposer methods LVSpecDrafter overrides for a video-aware draft (and for a
# text-only draft of an M-RoPE target), with the parameters it
# relies on (vLLM 0.32). A release that changes them must fail at startup, not mid-request.
PROPOSER_HOOKS = {
    "set_inputs_first_pass": ("target_token_ids", "next_token_ids", "target_positions",
                              "target_hidden_states", "token_indices_to_sample", "cad",
                              "num_rejected_tokens_gpu"),
    "build_model_inputs_first_pass": ("num_tokens", "num_input_tokens", "mm_embed_inputs"),
    "_update_positions_dependent_metadata": ("positions", "common_attn_metadata", "batch_size",
                                             "input_batch_size", "block_size"),
    "_get_positions": ("num_tokens",),
}


def proposer_hook_problems(base: type) -> list[str]:
    """Where ``base`` (vLLM's draft proposer) no longer has the methods the drafter overrides."""
    import inspect

    problems = []
    for name, params in PROPOSER_HOOKS.items():
        method = getattr(base, name, None)
        if method is None:
            problems.append(f"{base.__name__}.{name} is gone")
            continue
        got = tuple(inspect.signature(method).parameters)[1:]
        if got != params:
            problems.append(f"{base.__name__}.{name}{got} (expected {params})")
    return problems
