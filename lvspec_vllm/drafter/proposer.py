"""LVSpecDrafter: the draft proposer LVSpec installs in the V1 model runner.

It is vLLM's ``draft_model`` proposer (own KV cache, target's vocabulary, greedy drafting) with
two additions:

* **A draft that sees the video.** vLLM refuses an M-RoPE draft and never shows a draft the
  request's images or videos. A same-family vision-language draft (``compat.py``) runs its own
  vision encoder on the request's pixels (``vision.py``), takes the target's M-RoPE positions in
  its first pass (``positions.py``) and advances KV slots by the sequence index, which after a
  video runs ahead of M-RoPE's temporal row. A text-only draft drafts exactly as vLLM's does.
* **k from the scheduler.** The per-step k comes from vLLM's scheduler
  (``num_speculative_tokens_per_batch_size``, or auto_k). At k = 0 vLLM's proposer still runs one
  draft forward over the step's new tokens so that the draft's KV cache stays complete for later
  steps that do draft; when the schedule is 0 at every batch size no step ever drafts, and that
  pass is skipped too.

It stays a ``DraftModelProposer`` so the runner's ``isinstance`` checks keep routing it through
the draft-model path.
"""

from __future__ import annotations

import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from lvspec_vllm.drafter.compat import proposer_hook_problems
from lvspec_vllm.drafter.positions import draft_mrope_positions
from lvspec_vllm.drafter.vision import DraftVision, Window

DRAFTER_COUNTERS = ("propose_calls", "drafting_passes", "kv_sync_passes", "skipped_passes",
                    "proposed_tokens", "encoded_items", "visual_tokens_in")


class LVSpecDrafter(DraftModelProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner  # the draft's visual inputs come from the runner's request states
        schedule = self.speculative_config.num_speculative_tokens_per_batch_size
        self.never_drafts = bool(schedule) and max(entry[-1] for entry in schedule) == 0
        self._counts = dict.fromkeys(DRAFTER_COUNTERS[:5], 0)
        self.vision: DraftVision | None = None
        if self.sees_video and (problems := proposer_hook_problems(DraftModelProposer)):
            raise RuntimeError("LVSpec's video-aware drafter does not fit this vLLM's draft "
                               "proposer: " + "; ".join(problems))
        if self.sees_video and self.uses_mrope:
            # vLLM keeps only M-RoPE rows for an M-RoPE draft; KV slots need the sequence index
            self.positions = torch.zeros(self.max_positions, dtype=torch.int64,
                                         device=self.device)
        self._seq_next: torch.Tensor | None = None
        self._mm_inputs = None
        self._retained_for: set[str] = set()  # the request ids the cache was last pruned for

    @property
    def sees_video(self) -> bool:
        # the engine-args check let only same-family vision-language drafts through
        return self.draft_model_config.is_multimodal_model

    @property
    def counts(self) -> dict[str, int]:
        vision = self.vision.counts if self.vision is not None else {}
        return {**self._counts, "encoded_items": vision.get("encoded_items", 0),
                "visual_tokens_in": vision.get("visual_tokens_in", 0)}

    # vLLM's refusals, which a video-aware draft lifts
    def _raise_if_mrope(self):
        if not self.sees_video:
            super()._raise_if_mrope()

    def _warn_if_multimodal(self):
        if not self.sees_video:
            super()._warn_if_multimodal()

    def load_model(self, target_model) -> None:
        super().load_model(target_model)
        if self.sees_video:
            self.vision = DraftVision(self.model, self.device)

    # -- one propose call per engine step --------------------------------------------------------
    def propose(self, num_speculative_tokens, *args, **kwargs):
        c = self._counts
        c["propose_calls"] += 1
        cad = kwargs.get("common_attn_metadata")
        if num_speculative_tokens == 0:
            if self.never_drafts:
                c["skipped_passes"] += 1
                self._last_draft_probs = None
                return torch.empty(cad.batch_size(), 0, dtype=torch.int64,
                                   device=self.device)
            c["kv_sync_passes"] += 1
        else:
            c["drafting_passes"] += 1
            c["proposed_tokens"] += num_speculative_tokens * cad.batch_size()
        return super().propose(num_speculative_tokens, *args, **kwargs)

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions,
                              target_hidden_states, token_indices_to_sample, cad,
                              num_rejected_tokens_gpu):
        if not self.sees_video:
            return super().set_inputs_first_pass(
                target_token_ids, next_token_ids, target_positions, target_hidden_states,
                token_indices_to_sample, cad, num_rejected_tokens_gpu)
        mrope = target_positions if self.uses_mrope else None
        if mrope is not None:  # vLLM's copy kernel and slot mapping take sequence positions
            target_positions = self.runner.positions[:target_token_ids.shape[0]]
        num_tokens, token_indices_to_sample, new_cad = super().set_inputs_first_pass(
            target_token_ids, next_token_ids, target_positions, target_hidden_states,
            token_indices_to_sample, cad, num_rejected_tokens_gpu)
        slots = self.extra_slots_per_request
        if mrope is not None:
            self.mrope_positions[:, :num_tokens] = draft_mrope_positions(
                mrope, cad.query_start_loc, slots, num_tokens)
            self._seq_next = self.positions[token_indices_to_sample]
        self._mm_inputs = self._gather_visual_inputs(cad, slots, num_tokens)
        return num_tokens, token_indices_to_sample, new_cad

    def _gather_visual_inputs(self, cad, slots: int, num_tokens: int):
        runner = self.runner
        qsl = cad.query_start_loc_cpu.tolist()
        windows = []
        for r, req_id in enumerate(runner.input_batch.req_ids[:cad.batch_size()]):
            state = runner.requests[req_id]
            windows.append(Window(state.mm_features, state.num_computed_tokens,
                                  qsl[r + 1] - qsl[r], qsl[r] + r * slots))
        # An entry can only have died if a request left: skip the walk on steady decode steps.
        if self.vision.cache and runner.requests.keys() != self._retained_for:
            self._retained_for = set(runner.requests)
            self.vision.retain({f.identifier for state in runner.requests.values()
                                for f in state.mm_features})
        return self.vision.gather(windows, num_tokens)

    def build_model_inputs_first_pass(self, num_tokens, num_input_tokens, mm_embed_inputs):
        if self.sees_video:
            # the runner's mm_embed_inputs are the target's encoder outputs in EAGLE's layout
            mm_embed_inputs, self._mm_inputs = self._mm_inputs, None
        return super().build_model_inputs_first_pass(num_tokens, num_input_tokens,
                                                      mm_embed_inputs)

    def _update_positions_dependent_metadata(self, positions, common_attn_metadata, batch_size,
                                             input_batch_size, block_size):
        if not (self.sees_video and self.uses_mrope):
            return super()._update_positions_dependent_metadata(
                positions, common_attn_metadata, batch_size, input_batch_size, block_size)
        # vLLM advances the KV slot from M-RoPE's temporal row, which after a video trails the
        # sequence index. Advance the sequence index through vLLM's 1-D path instead, and M-RoPE
        # beside it: each drafted token is text, all three rows one past the previous token.
        self.uses_mrope = False
        try:
            self._seq_next = super()._update_positions_dependent_metadata(
                self._seq_next, common_attn_metadata, batch_size, input_batch_size, block_size)
        finally:
            self.uses_mrope = True
        self.mrope_positions[:, :batch_size] = positions[0] + 1
        return self.mrope_positions[:, :batch_size]

    def cache_bytes(self) -> int:
        return self.vision.cache_bytes() if self.vision is not None else 0
