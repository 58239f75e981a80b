"""Qwen2.5-VL M-RoPE positions as the reference implementation and vLLM compute them.

After an image or video, the reference continues the text at the largest position the vision
block used, plus one. transformers 5.19 (``Qwen2_5_VLModel.get_rope_index``) instead advances by
``max(h, w) / merge``, ignoring the temporal scaling of videos: for a 4-slot video at 2 tokens per
second it starts the following text 5 positions earlier than vLLM does (images agree). Anything
here that trains or checks a model with HF transformers and then runs it in vLLM uses these
positions, so both sides see the same sequence:

    install(model)               # HF Qwen2_5_VLForConditionalGeneration: forward and generate
    text_draft_positions(...)    # what vLLM feeds a text-only draft of an M-RoPE target
"""

from __future__ import annotations

import itertools
import types

import torch


def reference_rope_index(self, input_ids, mm_token_type_ids, image_grid_thw=None,
                         video_grid_thw=None, second_per_grid_ts=None, attention_mask=None,
                         **kwargs):
    """Drop-in for ``Qwen2_5_VLModel.get_rope_index`` (same arguments and returns)."""
    if mm_token_type_ids is None:  # 0 text, 1 image, 2 video, as the HF processor marks them
        mm_token_type_ids = (input_ids == self.config.image_token_id).long() + \
            2 * (input_ids == self.config.video_token_id).long()
    merge = self.config.vision_config.spatial_merge_size
    tokens_per_second = self.config.vision_config.tokens_per_second
    position_ids = torch.ones(3, *input_ids.shape, dtype=input_ids.dtype,
                              device=input_ids.device)
    grids = {1: iter(image_grid_thw) if image_grid_thw is not None else None,
             2: iter(video_grid_thw) if video_grid_thw is not None else None}
    seconds = iter(second_per_grid_ts) if second_per_grid_ts is not None else itertools.repeat(1)
    deltas = []
    for b in range(input_ids.shape[0]):
        keep = attention_mask[b].bool() if attention_mask is not None else \
            torch.ones_like(input_ids[b], dtype=torch.bool)
        kinds = mm_token_type_ids[b][keep].tolist()
        parts, cur = [], 0
        for kind, group in itertools.groupby(kinds):
            n = len(list(group))
            if kind == 0:
                parts.append(torch.arange(n, device=input_ids.device).expand(3, -1) + cur)
                cur += n
                continue
            thw = next(grids[kind])
            interval = tokens_per_second * float(next(seconds)) if kind == 2 else 1
            vision = self.get_vision_position_ids(cur, thw, 1, merge, interval,
                                                  device=input_ids.device)
            parts.append(vision)
            cur = int(vision.max()) + 1  # the reference (and vLLM): after the largest position
        positions = torch.cat(parts, dim=1)
        position_ids[:, b, keep] = positions.to(position_ids.dtype)
        deltas.append(int(positions.max()) + 1 - int(keep.sum()))
    return position_ids, torch.tensor(deltas, device=input_ids.device).unsqueeze(1)


def install(model) -> None:
    """Make an HF Qwen2.5-VL model use the reference positions in forward and generate."""
    inner = model.model
    inner.get_rope_index = types.MethodType(reference_rope_index, inner)


def text_draft_positions(vl_config, enc) -> torch.Tensor:
    """1-D positions vLLM gives a text-only draft of an M-RoPE target: the target's temporal row
    (``SpecDecodeBaseProposer`` takes ``positions[0]``). ``vl_config``: the target's config."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    # get_vision_position_ids reads nothing from the instance: a config holder is enough
    holder = types.SimpleNamespace(config=vl_config)
    holder.get_vision_position_ids = types.MethodType(Qwen2_5_VLModel.get_vision_position_ids,
                                                      holder)
    positions, _ = reference_rope_index(holder, enc["input_ids"], enc["mm_token_type_ids"],
                                        video_grid_thw=enc.get("video_grid_thw"),
                                        second_per_grid_ts=enc.get("second_per_grid_ts"),
                                        attention_mask=enc["attention_mask"])
    return positions[0]
