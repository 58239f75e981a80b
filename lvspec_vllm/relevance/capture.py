"""Visual relevance capture on the attention call (the path that needs no cache layout).

The target's selected attention layers call ``observe`` with their post-RoPE query and key
(see ``lvspec_vllm.patches.attention``). For every request with images or videos, the keys are
kept by sequence position (so chunked prefill, rejected drafts and recompute after preemption
simply overwrite them), and for every row that verifies a draft this step the per-head visual
mass is computed, for all requests of the step at once (``reference.batched_visual_mass``: the
per-step cost does not grow a Python loop with the batch), and summed over heads and layers into
a per-token buffer, in batch order. The rejection sampler reads that buffer.

With ``draft_pruning`` it also scores the prompt for the draft (``prompt_scores``): the attention
each key receives from the prompt's text rows after a visual token, SpecVLM's stage I. Pruning
alone (no anchor identification) keeps a request's keys only until its prompt is prefilled.

It reads keys it captured itself, never the KV cache: the CPU backend stores the cache in a
packed, ISA-specific layout. Memory: 2 x num_kv_heads_per_rank x head_dim bytes (bf16) per
token and selected layer, for every live request with visual input, freed when the request
leaves the runner. Keys of positions served from the prefix cache are never seen, so loose
verification with identification refuses prefix caching at startup.
"""

from __future__ import annotations

import re

import torch

from lvspec_vllm.relevance.reference import batched_visual_mass, key_attention, visual_ranges

_LAYER_INDEX = re.compile(r"\.layers\.(\d+)\.")


def select_layers(layer_names: list[str], spec: tuple) -> dict[str, int]:
    """{attention layer name: decoder index} of the target layers named by ``relevance_layers``
    (ints: indices, negative from the end; floats in (0, 1): fractions of the depth)."""
    by_index = {}
    for name in layer_names:
        m = _LAYER_INDEX.search(name)
        if m and not name.startswith("draft_model."):
            by_index[int(m.group(1))] = name
    depth = len(by_index)
    chosen = set()
    for entry in spec:
        idx = int(entry * depth) if isinstance(entry, float) else entry
        idx = idx + depth if idx < 0 else idx
        if not 0 <= idx < depth:
            raise ValueError(f"LVSpec option 'relevance_layers' entry {entry!r} is outside the "
                             f"target's {depth} decoder layers.")
        chosen.add(idx)
    return {by_index[i]: i for i in sorted(chosen)}


class RelevanceCapture:
    def __init__(self, runner, layers: dict[str, int], masses: bool = True,
                 prompt_scores: bool = False):
        self.runner = runner
        self.layers = layers
        self.masses = masses  # per-row visual masses of verify rows (anchor identification)
        # SpecVLM's stage I: {req_id: [positions] attention each key got from the prompt's text
        # rows after the first visual token, summed over rows, heads and layers}
        self.prompt_scores: dict[str, torch.Tensor] | None = {} if prompt_scores else None
        self.first_layer = min(layers.values()) if layers else None
        self._keys: dict[tuple[str, int], torch.Tensor] = {}
        self._visual: dict[str, torch.Tensor] = {}  # a request's visual runs, built once
        self._visual_mask: dict[str, torch.Tensor] = {}  # and as a mask over its prompt
        self._plan: list[tuple] = []
        # this step's verify rows, the same for every layer: (request ids, their lengths,
        # row index in the step, row -> request, row context length, padded visual mask)
        self._verify: tuple | None = None
        self.mass_sum: torch.Tensor | None = None  # [num_tokens] summed over heads and layers
        self.heads: int = 0  # query heads on this rank, per layer
        # tests: {(req_id, position): {layer: mean mass over this rank's heads}, "steps":
        # [(first position, tokens) of every target forward]}, when not None
        self.record: dict | None = None

    # -- per step -----------------------------------------------------------------------------
    def _begin_step(self, attn_metadata, num_tokens: int, device) -> None:
        live = self.runner.requests
        for key in [k for k in self._keys if k[0] not in live]:
            del self._keys[key]
        for req_id in [r for r in self._visual if r not in live]:
            del self._visual[req_id]
            self._visual_mask.pop(req_id, None)
        if self.prompt_scores:
            for req_id in [r for r in self.prompt_scores if r not in live]:
                del self.prompt_scores[req_id]
        qsl = attn_metadata.query_start_loc.tolist()
        seq_lens = attn_metadata.seq_lens.tolist()
        batch = self.runner.input_batch
        req_ids = batch.req_ids[:len(seq_lens)]
        # requests the draft never runs for (draft_cold_requests) are never verified
        cold = getattr(getattr(self.runner, "drafter", None), "cold_request_ids", ())
        self._plan = []
        for i, req_id in enumerate(req_ids):
            request = live.get(req_id)
            if request is None or not request.mm_features:
                continue  # no visual evidence: nothing to capture
            if req_id in cold:
                for layer in self.layers.values():
                    self._keys.pop((req_id, layer), None)
                continue
            q_len = qsl[i + 1] - qsl[i]
            first_pos = seq_lens[i] - q_len
            # The rows that verify drafts: the last sampled token's and every draft's but the
            # last. A request without drafts this step (prefill, or k = 0) needs no masses.
            verified = int(batch.num_tokens_no_spec[i]) - 1
            rows = (max(verified - first_pos, 0), max(q_len - 1, 0)) if self.masses else (0, 0)
            visual = self._visual.get(req_id)
            if visual is None:
                visual = self._visual[req_id] = visual_ranges(
                    [f.mm_position for f in request.mm_features])
            self._plan.append((req_id, qsl[i], q_len, first_pos, rows, visual,
                               request.num_prompt_tokens))
            if first_pos == 0 and self.prompt_scores:
                self.prompt_scores.pop(req_id, None)  # a (re)started prefill scores afresh
        self.mass_sum = torch.zeros(num_tokens, dtype=torch.float32, device=device) \
            if self.masses else None
        self._verify = self._verify_rows(device)

    def _verify_rows(self, device) -> tuple | None:
        req_ids, lengths, rows, row_req, ctx = [], [], [], [], []
        for req_id, start, q_len, first_pos, (first_row, end_row), ranges, _ in self._plan:
            if first_row >= end_row:
                continue
            rows.extend(range(start + first_row, start + end_row))
            row_req.extend([len(req_ids)] * (end_row - first_row))
            ctx.extend(range(first_pos + first_row + 1, first_pos + end_row + 1))
            req_ids.append(req_id)
            lengths.append(first_pos + q_len)
        if not req_ids:
            return None
        visual = torch.zeros(len(req_ids), max(lengths), dtype=torch.bool)
        for b, req_id in enumerate(req_ids):
            mask = self._visual_mask.get(req_id)
            if mask is None:
                ranges = self._visual[req_id]
                mask = torch.zeros(int(ranges[:, 1].max()) if ranges.numel() else 0,
                                   dtype=torch.bool)
                for a, e in ranges.tolist():
                    mask[a:e] = True
                mask = self._visual_mask[req_id] = mask
            n = min(mask.numel(), lengths[b])
            visual[b, :n] = mask[:n]

        def tensor(x):
            return torch.tensor(x, dtype=torch.long).to(device, non_blocking=True)

        return req_ids, lengths, tensor(rows), tensor(row_req), tensor(ctx), visual.to(device)

    def observe(self, layer_name: str, query: torch.Tensor, key: torch.Tensor, attn_metadata,
                scale: float, num_heads: int, num_kv_heads: int, head_size: int) -> None:
        layer = self.layers[layer_name]
        n = attn_metadata.num_actual_tokens
        q = query[:n].view(n, num_heads, head_size)
        k = key[:n].view(n, num_kv_heads, head_size)
        if layer == self.first_layer:
            self._begin_step(attn_metadata, n, query.device)
            self.heads = num_heads
        for req_id, start, q_len, first_pos, (first_row, end_row), ranges, prompt_len \
                in self._plan:
            end_pos = first_pos + q_len
            if self.record is not None and layer == self.first_layer:
                self.record.setdefault("steps", []).append((first_pos, q_len))
            if not self.masses and first_pos >= prompt_len:
                continue  # draft pruning alone needs the prompt's keys only
            store = self._store(req_id, layer, end_pos, k)
            store[first_pos:end_pos] = k[start:start + q_len]
            if self.prompt_scores is not None and first_pos < prompt_len:
                self._score_prompt(req_id, q[start:start + q_len], store[:end_pos], first_pos,
                                   prompt_len, ranges, scale)
                if not self.masses and end_pos >= prompt_len:
                    del self._keys[(req_id, layer)]
        if self._verify is not None:
            self._masses(layer, q, scale)

    def _masses(self, layer: int, q: torch.Tensor, scale: float) -> None:
        """The visual masses of every verify row of the step at this layer, in one batch."""
        req_ids, lengths, rows, row_req, ctx, visual = self._verify
        keys = torch.nn.utils.rnn.pad_sequence(
            [self._keys[(r, layer)][:n] for r, n in zip(req_ids, lengths)], batch_first=True)
        mass = batched_visual_mass(q[rows], keys, visual, row_req, ctx, scale)
        self.mass_sum.index_add_(0, rows, mass.sum(dim=-1))
        if self.record is not None:
            for r, c, m in zip(row_req.tolist(), ctx.tolist(), mass.mean(dim=-1).tolist()):
                self.record.setdefault((req_ids[r], c - 1), {})[layer] = m

    def _score_prompt(self, req_id, q, keys, first_pos, prompt_len, ranges, scale) -> None:
        """Stage-I scores: attention from this step's prompt text rows that follow a visual
        token (the question about the video) to every earlier key."""
        if not ranges.numel():
            return
        pos = torch.arange(first_pos, first_pos + q.shape[0])
        text = (pos < prompt_len) & (pos > int(ranges[:, 0].min()))
        for a, b in ranges.tolist():
            text &= (pos < a) | (pos >= b)
        if not text.any():
            return
        rows = text.nonzero().squeeze(1).to(q.device)
        got = key_attention(q[rows], keys, (pos[text] + 1).to(q.device), scale)
        acc = self.prompt_scores.get(req_id)
        if acc is None or acc.numel() < got.numel():
            grown = torch.zeros(got.numel(), dtype=torch.float32, device=got.device)
            if acc is not None:
                grown[:acc.numel()] = acc
            acc = self.prompt_scores[req_id] = grown
        acc[:got.numel()] += got

    def key_bytes(self) -> int:
        """Memory held for captured keys (all requests and layers of this rank)."""
        return sum(t.numel() * t.element_size() for t in self._keys.values())

    def _store(self, req_id: str, layer: int, length: int, like: torch.Tensor) -> torch.Tensor:
        store = self._keys.get((req_id, layer))
        if store is None or store.shape[0] < length:
            grown = like.new_zeros((max(length, 2 * (0 if store is None else store.shape[0])),
                                    *like.shape[1:]))
            if store is not None:
                grown[:store.shape[0]] = store
            store = self._keys[(req_id, layer)] = grown
        return store
