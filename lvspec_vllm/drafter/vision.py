"""The draft's own view of the request's images and videos.

vLLM hands a drafter the *target's* encoder outputs, laid out for EAGLE heads (inputs shifted by
one token, the target's hidden size): useless to a smaller vision-language draft. Here the draft's
vision encoder runs on the request's own preprocessed pixels, once per item (keyed by vLLM's
multimodal hash, so an item shared by requests is encoded once), and its embeddings are placed at
the item's placeholder tokens in the draft's first-pass layout (see ``positions.py``).

Encoding is lazy: the first draft pass that reaches an item encodes it. An entry lives while a
live request refers to its item, and is dropped once none does. Its size is
``visual tokens x draft hidden size x dtype bytes`` per item.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Window:
    """One request of the step: which sequence positions its scheduled tokens cover."""

    mm_features: list  # vLLM MultiModalFeatureSpec, sorted by offset
    num_computed: int  # sequence position of the first scheduled token
    num_scheduled: int
    out_start: int  # index of the first scheduled token in the draft's first-pass layout


class DraftVision:
    def __init__(self, model: Any, device: torch.device):
        self.model = model
        self.device = device
        self.cache: dict[str, torch.Tensor] = {}
        self.counts = {"encoded_items": 0}

    # -- the encoder cache -----------------------------------------------------------------------
    def retain(self, live_identifiers: set[str]) -> None:
        for key in [k for k in self.cache if k not in live_identifiers]:
            del self.cache[key]

    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.cache.values())

    def _encode(self, features: list) -> None:
        from vllm.multimodal.utils import group_and_batch_mm_kwargs

        missing, seen = [], set()
        for f in features:
            if f.identifier in self.cache or f.identifier in seen:
                continue
            if f.data is None:
                raise RuntimeError(
                    f"LVSpec draft: no pixels for multimodal item {f.identifier} (its data was "
                    f"dropped before the draft encoded it).")
            seen.add(f.identifier)
            missing.append(f)
        if not missing:
            return
        # one encoder call per modality, as the target's runner batches them
        order = sorted(range(len(missing)), key=lambda i: missing[i].modality)
        missing = [missing[i] for i in order]
        outputs: list[torch.Tensor] = []
        for _, _, batch in group_and_batch_mm_kwargs(
                [(f.modality, f.data) for f in missing], device=self.device, pin_memory=False):
            outputs.extend(self.model.embed_multimodal(**batch))
        for f, out in zip(missing, outputs):
            self.cache[f.identifier] = out
        self.counts["encoded_items"] += len(missing)

    # -- the first pass's inputs -----------------------------------------------------------------
    def gather(self, windows: list[Window], num_out: int
               ) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(embeddings, mask) for ``embed_input_ids``: the draft's encoder rows for every
        placeholder position among the scheduled tokens, in token order; None if there are none."""
        from vllm.multimodal.utils import get_mm_features_in_window

        spans = []  # (window, feature, start_idx, end_idx) in token order
        for w in windows:
            lo, hi = get_mm_features_in_window(w.mm_features, w.num_computed,
                                               w.num_computed + w.num_scheduled)
            for f in w.mm_features[lo:hi]:
                pos = f.mm_position
                start = max(w.num_computed - pos.offset, 0)
                end = min(w.num_computed + w.num_scheduled - pos.offset, pos.length)
                if start < end:
                    spans.append((w, f, start, end))
        if not spans:
            return None
        self._encode([f for _, f, _, _ in spans])
        embeds: list[torch.Tensor] = []
        mask = torch.zeros(num_out, dtype=torch.bool)
        for w, f, start, end in spans:
            pos = f.mm_position
            e0, e1 = pos.get_embeds_indices_in_range(start, end)
            if e0 == e1:
                continue
            embeds.append(self.cache[f.identifier][e0:e1])
            base = w.out_start + pos.offset - w.num_computed
            if pos.is_embed is None:
                mask[base + start:base + end] = True
            else:
                mask[base + start:base + end] |= pos.is_embed[start:end]
        if not embeds:
            return None
        return embeds, mask.to(self.device, non_blocking=True)
