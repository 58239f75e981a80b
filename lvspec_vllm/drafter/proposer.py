"""LVSpecDrafter: the draft proposer LVSpec installs in the V1 model runner.

It is vLLM's ``draft_model`` proposer (own KV cache, target's vocabulary, greedy drafting) with
these additions:

* **A draft that sees the video.** vLLM refuses an M-RoPE draft and never shows a draft the
  request's images or videos. A same-family vision-language draft (``compat.py``) runs its own
  vision encoder on the request's pixels (``vision.py``), takes the target's M-RoPE positions in
  its first pass (``positions.py``) and advances KV slots by the sequence index, which after a
  video runs ahead of M-RoPE's temporal row.
* **A text-only draft of an M-RoPE target** drafts as vLLM's does (RoPE on the target's temporal
  row), except that its KV slots follow the sequence index: vLLM derives them from the temporal
  row, which after a video puts later tokens' KV on earlier tokens' slots.
* **Pruning (SpecVLM, opt-in).** The draft keeps a share of each video's tokens, chosen from the
  target's prefill attention, and runs on a compacted copy of the request's sequence
  (``pruning.py``; ``_decide_pruning``, ``_drop_pruned``).
* **Its own clock.** ``counts["draft_us"]`` is the time spent in ``propose`` (the draft's
  encoder and forward passes), CUDA events on a GPU so the step never waits for it
  (``timing.py``). With ``auto_k`` and cold requests each call is also a sample of what it
  ran, from which ``auto_k`` prices the draft's prefill (``take_timed_passes``).
* **k from the scheduler.** The per-step k comes from vLLM's scheduler
  (``num_speculative_tokens_per_batch_size``, or auto_k). At k = 0 vLLM's proposer still runs one
  draft forward over the step's new tokens so that the draft's KV cache stays complete for later
  steps that do draft. Here decoding requests skip that pass and catch up the next time the draft
  runs for them (``lag.py``, option ``draft_catch_up``); a step in which every request waits runs
  no draft forward at all, and takes vLLM's plain path (``begin_plain_step``,
  ``patches/plain_step.py``). When the schedule is 0 at every batch size no step ever drafts,
  and nothing is recorded either.

It stays a ``DraftModelProposer`` so the runner's ``isinstance`` checks keep routing it through
the draft-model path.
"""

from __future__ import annotations

import torch
from vllm.v1.spec_decode.draft_model import DraftModelProposer

from lvspec_vllm.drafter.compat import proposer_hook_problems
from lvspec_vllm.drafter.lag import Row, chunks  # per step: not imported in the step loop
from lvspec_vllm.drafter.positions import draft_mrope_positions, sequence_positions
from lvspec_vllm.drafter.timing import StepTimer
from lvspec_vllm.drafter.vision import DraftVision, Window

DRAFTER_COUNTERS = ("propose_calls", "drafting_passes", "kv_sync_passes", "skipped_passes",
                    "skipped_before_inputs", "proposed_tokens", "visual_tokens_in",
                    "pruned_visual_tokens", "pruned_items_scored", "pruned_items_unscored",
                    "encoded_items", "draft_us", "deferred_tokens", "caught_up_tokens",
                    "dropped_tokens", "cold_requests", "cold_prefix_hits", "plain_steps",
                    "plain_cold_steps")
LAG_COUNTERS = ("deferred_tokens", "caught_up_tokens", "dropped_tokens")
COLD_COUNTERS = ("cold_requests", "cold_prefix_hits")
# kept by the encoder cache, the timer, the lag and the cold requests
_DERIVED = ("encoded_items", "draft_us", *LAG_COUNTERS, *COLD_COUNTERS)


class LVSpecDrafter(DraftModelProposer):
    def __init__(self, vllm_config, device, runner=None):
        super().__init__(vllm_config=vllm_config, device=device, runner=runner)
        self.runner = runner  # the draft's visual inputs come from the runner's request states
        schedule = self.speculative_config.num_speculative_tokens_per_batch_size
        self.never_drafts = bool(schedule) and max(entry[-1] for entry in schedule) == 0
        self._counts = dict.fromkeys((c for c in DRAFTER_COUNTERS if c not in _DERIVED), 0)
        self._catch_up = False
        self.lag = None  # DraftLag, after enable_catch_up()
        self._cold = False  # draft_cold_requests, after enable_cold_requests()
        self.cold = None  # ColdRequests, after enable_cold_requests()
        self._planned = None  # this step's (rows, run, wait), when already planned
        self._waiting = None  # a skipped step's (rows, rows that wait, query_start_loc)
        # k = 0 steps without a draft forward take vLLM's plain path (patches/plain_step.py)
        self.plain_steps = False
        self._pass = None  # (request ids, first positions, sequence positions) of a catch-up pass
        self.timer = StepTimer(device)
        self.vision: DraftVision | None = None
        if self.sees_video and self.uses_mrope:
            # vLLM keeps only M-RoPE rows for an M-RoPE draft; KV slots need the sequence index
            self.positions = torch.zeros(self.max_positions, dtype=torch.int64,
                                         device=self.device)
        self._seq_next: torch.Tensor | None = None
        # A text-only draft of an M-RoPE target: KV slots follow the sequence index
        # (self.positions), RoPE the target's temporal row, as vLLM intends (both buffers 1-D).
        self._rope = torch.zeros_like(self.positions) if not self.sees_video and \
            vllm_config.model_config.uses_mrope else None
        self._rope_delta: torch.Tensor | None = None  # per request: RoPE minus sequence index
        if (self.sees_video or self._rope is not None) and \
                (problems := proposer_hook_problems(DraftModelProposer)):
            raise RuntimeError("LVSpec's drafter does not fit this vLLM's draft proposer: "
                               + "; ".join(problems))
        self._mm_inputs = None
        self._retained_for: set[str] = set()  # the request ids the cache was last pruned for
        # SpecVLM pruning (enable_pruning): {req_id: {item index: pruned sequence positions}}
        self.pruning: tuple[float, float] | None = None
        self.prompt_attention = None  # the target's RelevanceCapture, for stage-I scores
        self._pruned: dict[str, dict[int, torch.Tensor]] = {}
        self._pruned_sorted: dict[str, torch.Tensor] = {}  # per request, all items, merged

    @property
    def sees_video(self) -> bool:
        # the engine-args check let only same-family vision-language drafts through
        return self.draft_model_config.is_multimodal_model

    @property
    def counts(self) -> dict[str, int]:
        vision = self.vision.counts if self.vision is not None else {}
        lag = self.lag.counts if self.lag is not None else {}
        cold = self.cold.counts if self.cold is not None else {}
        return {**self._counts, "encoded_items": vision.get("encoded_items", 0),
                "draft_us": self.timer.total_us(),
                **{c: lag.get(c, 0) for c in LAG_COUNTERS},
                **{c: cold.get(c, 0) for c in COLD_COUNTERS}}

    def enable_pruning(self, keep_ratio: float, stage1_share: float, prompt_attention) -> None:
        """SpecVLM's pruning of the draft's video tokens (``pruning.py``)."""
        if not self.sees_video:
            raise RuntimeError("LVSpec 'draft_pruning' needs a draft that sees the video")
        self.pruning = (keep_ratio, stage1_share)
        self.prompt_attention = prompt_attention

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
    def propose(self, num_speculative_tokens, **kwargs):
        # (the counts reach /metrics through the sampler's publisher, which reads them itself)
        return self._propose(num_speculative_tokens, **kwargs)

    def propose_without_inputs(self, k: int, batch: int, query_start_loc: list[int],
                               step_ids) -> torch.Tensor | None:
        """Before vLLM prepares the draft's inputs (``patches/propose.py``): the step's drafts
        if it runs no draft forward (k = 0 or every row cold, and nobody must catch up; the
        waiting rows record their tokens from ``step_ids()``), else None, and vLLM's path runs
        ``propose``. That preparation (the next tokens, the padded first-pass layout, the
        draft's multimodal inputs) is otherwise paid in full for a pass that does not happen."""
        if not self._skips(batch, query_start_loc, k):
            return None
        self._end_skipped_step(step_ids())
        return self._no_drafts(batch) if k == 0 else self._cold_drafts(batch, k, [], None)

    def begin_plain_step(self, batch: int, query_start_loc: list[int], k: int = 0) -> bool:
        """Once vLLM has laid out a step that verifies no drafts (``patches/plain_step.py``):
        whether the draft runs no forward in it either. At k = 0 nobody must catch up; at
        k > 0 every row is also cold (``cold.py``), so none drafts. If so the runner takes
        vLLM's plain path, without calling the drafter, and ``end_plain_step`` records the
        step; else the step is planned and runs as any other."""
        if not self.plain_steps or not self._skips(batch, query_start_loc, k):
            return False
        self._counts["plain_steps"] += 1
        self._counts["plain_cold_steps"] += k > 0
        return True

    def end_plain_step(self, step_ids: torch.Tensor) -> None:
        """After a plain step: the waiting rows record their tokens (the step's input ids)."""
        self._end_skipped_step(step_ids)

    def _skips(self, batch: int, query_start_loc: list[int], k: int = 0) -> bool:
        # whether the draft runs no forward in this step (planned once per step): at k = 0 all
        # rows wait or are cold, at k > 0 all are cold
        if self.never_drafts:
            return k == 0  # (the schedule is 0 at every batch size)
        if self.lag is None or (k > 0 and self.cold is None):
            return False
        rows = self._rows(batch, query_start_loc)
        run, wait = self._plan(rows, k)
        if run:
            self._planned = (rows, run, wait)  # vLLM's path runs propose on this step
            return False
        self._waiting = (rows, wait, query_start_loc)
        return True

    def _end_skipped_step(self, step_ids) -> None:
        waiting, self._waiting = self._waiting, None
        if waiting is not None:
            self.lag.record(*waiting, step_ids)
        c = self._counts
        c["propose_calls"] += 1
        c["skipped_passes"] += 1
        c["skipped_before_inputs"] += 1
        self._last_draft_probs = None

    def _rows(self, batch: int, query_start_loc: list[int]):
        runner, qsl, rows = self.runner, query_start_loc, []
        for i, req_id in enumerate(runner.input_batch.req_ids[:batch]):
            state = runner.requests[req_id]
            rows.append(Row(req_id, state.num_computed_tokens, qsl[i + 1] - qsl[i],
                            state.num_computed_tokens >= state.num_prompt_tokens,
                            state.mrope_position_delta or 0))
        return rows

    def _propose(self, num_speculative_tokens, **kwargs):
        c = self._counts
        c["propose_calls"] += 1
        cad = kwargs["common_attn_metadata"]
        self._pass = None
        if num_speculative_tokens == 0 and self.never_drafts:
            c["skipped_passes"] += 1
            self._last_draft_probs = None
            return self._no_drafts(cad.batch_size())
        if self.lag is None and self._catch_up:  # the block size is known from the first step
            from lvspec_vllm.drafter.lag import DraftLag
            self.lag = DraftLag(self.block_size, self.max_batch_size, self.device)
            if self._cold:
                from lvspec_vllm.drafter.cold import ColdRequests
                self.cold = ColdRequests(self._block_table().block_size)
        with self.timer:
            if self.lag is None:
                self._count_pass(num_speculative_tokens, cad.batch_size())
                return super().propose(num_speculative_tokens, **kwargs)
            return self._propose_catching_up(num_speculative_tokens, kwargs)

    def _no_drafts(self, batch: int) -> torch.Tensor:
        return torch.empty(batch, 0, dtype=torch.int64, device=self.device)

    def _count_pass(self, k: int, batch_size: int) -> None:
        if k == 0:
            self._counts["kv_sync_passes"] += 1
        else:
            self._counts["drafting_passes"] += 1
            self._counts["proposed_tokens"] += k * batch_size

    def enable_catch_up(self) -> None:
        """Defer k = 0 draft passes of decoding requests (``lag.py``)."""
        if not self.needs_extra_input_slots:
            # a catch-up pass leaves the KV slots to vLLM's first pass, which computes them
            # only on this path (always taken by draft models)
            raise RuntimeError("LVSpec 'draft_catch_up' needs vLLM's draft-model first pass "
                               "with an extra input slot per request")
        self._catch_up = not self.never_drafts

    def enable_cold_requests(self) -> None:
        """Requests admitted at k = 0 never run the draft (``cold.py``); needs catch-up."""
        if self.never_drafts:
            return  # no request ever runs the draft: every one is cold already
        if not self._catch_up:
            raise RuntimeError("LVSpec 'draft_cold_requests' needs 'draft_catch_up'")
        if self._enable_probabilistic_draft_probs:
            # a pass over the warm rows only would misalign the per-request sampling metadata
            raise RuntimeError("LVSpec 'draft_cold_requests' needs greedy drafting "
                               "(vLLM's draft_sample_method 'greedy')")
        self._cold = True

    def enable_pass_timing(self) -> None:
        """Keep each timed propose call as a sample (``take_timed_passes``): ``auto_k`` with
        cold requests prices the draft's prefill from them."""
        self.timer.keep_samples = True

    def take_timed_passes(self) -> list[tuple]:
        """The propose calls timed since the last take: (k, requests run, prompt tokens, other
        first-pass tokens, seconds) each; empty unless ``enable_pass_timing``."""
        return self.timer.take_samples()

    @property
    def cold_request_ids(self) -> set[str]:
        return self.cold.cold if self.cold is not None else set()

    def _block_table(self):
        return self.runner.input_batch.block_table[self.kv_cache_gid]

    def _plan(self, rows, k: int) -> tuple[list[int], list[int]]:
        """(rows that run the draft, rows whose pass waits), in batch order; cold rows in
        neither."""
        planned, self._planned = self._planned, None
        if planned is not None and planned[0] == rows:
            return planned[1], planned[2]
        lag = self.lag
        if lag.pending:
            lag.forget(self.runner.requests)
        if self.cold is None:
            return lag.plan(rows, k)
        self.cold.forget(self.runner.requests)
        table = None  # looked up only if blocks are marked or checked (not in most steps)

        def block_ids(i: int, n: int) -> list[int]:
            nonlocal table
            if table is None:
                table = self._block_table().block_table.np
            return table[i, :n].tolist()

        cold = self.cold.step(rows, k, block_ids)
        warm = [i for i, c in enumerate(cold) if not c]
        for i, c in enumerate(cold):
            if c and rows[i].req_id in lag.pending:  # turned cold: its deferred pass is moot
                lag.discard(rows[i].req_id)
        run, wait = lag.plan([rows[i] for i in warm], k)
        return [warm[j] for j in run], [warm[j] for j in wait]

    def _propose_catching_up(self, k: int, kwargs):
        cad = kwargs["common_attn_metadata"]
        lag, batch = self.lag, cad.batch_size()
        if k > 0 and not lag.pending and self.cold is None:
            # steady drafting: nothing to catch up, vLLM's own pass
            self._count_pass(k, batch)
            return super().propose(k, **kwargs)
        qsl = cad.query_start_loc_cpu.tolist()
        rows = self._rows(batch, qsl)
        run, wait = self._plan(rows, k)
        lag.record(rows, wait, qsl, kwargs["target_token_ids"])
        if not run:
            self._counts["skipped_passes"] += 1
            self._last_draft_probs = None
            return self._no_drafts(batch) if k == 0 else self._cold_drafts(batch, k, [], None)
        prompt = sum(rows[i].num_tokens for i in run if not rows[i].decoding)
        other = sum(rows[i].num_tokens for i in run) - prompt + lag.pending_tokens(rows, run)
        self.timer.note(k, len(run), prompt, other)
        behind = lag.lagging(rows, run)
        if not behind and len(run) == batch:  # nothing to catch up: vLLM's own pass
            self._count_pass(k, batch)
            return super().propose(k, **kwargs)
        # The pass holds the step's rows, one extra slot per request and the tokens caught up.
        # Past the draft's buffers, the lagging requests catch up first in k = 0 passes of
        # their own (which also cover their rows of this step), and the last pass has no lag.
        size = sum(rows[i].num_tokens + self.extra_slots_per_request for i in run)
        if size + lag.pending_tokens(rows, run) > self.max_num_tokens:
            lagging = [rows[i].num_tokens + self.extra_slots_per_request
                       + lag.pending_tokens(rows, [i]) for i in behind]
            for group in chunks(lagging, self.max_num_tokens):
                self._count_pass(0, len(group))
                self._catch_up_pass(0, rows, [behind[j] for j in group], kwargs)
        self._count_pass(k, len(run))
        drafts = self._catch_up_pass(k, rows, run, kwargs)
        if k == 0:
            return self._no_drafts(batch)
        return drafts if len(run) == batch else self._cold_drafts(batch, k, run, drafts)

    def _cold_drafts(self, batch: int, k: int, run: list[int], drafts) -> torch.Tensor:
        """The step's drafts with a placeholder row for every cold request, whose list
        ``patches/drafts.py`` empties before the scheduler reads it."""
        out = torch.zeros(batch, k, dtype=torch.int64, device=self.device)
        if run:
            out[torch.tensor(run, device=self.device)] = drafts.to(out.dtype)
        return out

    def _catch_up_pass(self, k: int, rows, run: list[int], kwargs) -> torch.Tensor:
        """One draft pass over the step's requests ``run`` with their deferred tokens first."""
        from lvspec_vllm.drafter.lag import subset_metadata

        cad = kwargs["common_attn_metadata"]
        step_ids = kwargs["target_token_ids"]
        n = step_ids.shape[0]
        layout = self.lag.layout(rows, run, cad.query_start_loc_cpu.tolist(), n)
        dev = self.device
        ids = step_ids if self.lag.ids is None else torch.cat([step_ids, self.lag.ids.view(-1)])
        ids = ids[layout.src.to(dev)]
        seq_positions = layout.positions.to(dev)
        positions = kwargs["target_positions"]
        if positions.dim() == 2:  # M-RoPE: text after the prompt is one past on all three rows
            extra = (layout.pending_positions + layout.pending_mrope_delta).to(dev)
            positions = torch.cat([positions[:, :n], extra.expand(3, -1).to(positions.dtype)],
                                  dim=1)[:, layout.mrope_src.to(dev)]
        else:
            positions = seq_positions.to(positions.dtype)
        index = torch.tensor(run, dtype=torch.long)
        dev_index = index.to(dev)
        rejected = kwargs.get("num_rejected_tokens_gpu")
        self._pass = ([rows[i].req_id for i in run], layout.first, seq_positions)
        return super().propose(
            k, target_token_ids=ids, target_positions=positions,
            # the draft model reads no target hidden states (pass_hidden_states_to_model False)
            target_hidden_states=kwargs["target_hidden_states"],
            next_token_ids=kwargs["next_token_ids"][dev_index],
            token_indices_to_sample=None,  # the draft-model path computes its own
            common_attn_metadata=subset_metadata(cad, index, layout, dev),
            sampling_metadata=kwargs["sampling_metadata"],
            mm_embed_inputs=None,  # a video-aware draft gathers its own (below)
            num_rejected_tokens_gpu=None if rejected is None else rejected[dev_index],
            slot_mappings=kwargs.get("slot_mappings"))

    def _pass_requests(self, cad) -> tuple[list[str], list[int]]:
        """The pass's request ids and the sequence position of each one's first row."""
        if self._pass is not None:
            return self._pass[0], self._pass[1]
        req_ids = self.runner.input_batch.req_ids[:cad.batch_size()]
        return req_ids, [self.runner.requests[r].num_computed_tokens for r in req_ids]

    def _sequence_positions(self, cad, num_tokens: int) -> torch.Tensor:
        """Sequence positions of the pass's target tokens (the catch-up pass built its own)."""
        if self._pass is not None:
            return self._pass[2]
        return sequence_positions(cad.query_start_loc, cad.seq_lens, num_tokens)

    def set_inputs_first_pass(self, target_token_ids, next_token_ids, target_positions,
                              target_hidden_states, token_indices_to_sample, cad,
                              num_rejected_tokens_gpu):
        if not self.sees_video:
            if self._rope is None:
                return super().set_inputs_first_pass(
                    target_token_ids, next_token_ids, target_positions, target_hidden_states,
                    token_indices_to_sample, cad, num_rejected_tokens_gpu)
            # vLLM's copy kernel reads the first (temporal) of an M-RoPE target's 3 rows and
            # computes the KV slots from it. After a video that row trails the sequence index,
            # so the slots would land on earlier tokens'. Slots take the index; the temporal
            # row stays the draft's RoPE position.
            mrope = target_positions
            out = super().set_inputs_first_pass(
                target_token_ids, next_token_ids,
                self._sequence_positions(cad, target_token_ids.shape[0]), target_hidden_states,
                token_indices_to_sample, cad, num_rejected_tokens_gpu)
            num_tokens, tis = out[0], out[1]
            self._rope[:num_tokens] = draft_mrope_positions(
                mrope, cad.query_start_loc, self.extra_slots_per_request, num_tokens)[0]
            self._rope_delta = self._rope[tis] - self.positions[tis]
            return out
        mrope = target_positions if self.uses_mrope else None
        if mrope is not None:  # vLLM's copy kernel and slot mapping take sequence positions
            target_positions = self._sequence_positions(cad, target_token_ids.shape[0])
        num_tokens, token_indices_to_sample, new_cad = super().set_inputs_first_pass(
            target_token_ids, next_token_ids, target_positions, target_hidden_states,
            token_indices_to_sample, cad, num_rejected_tokens_gpu)
        slots = self.extra_slots_per_request
        if mrope is not None:
            self.mrope_positions[:, :num_tokens] = draft_mrope_positions(
                mrope, cad.query_start_loc, slots, num_tokens)
        self._mm_inputs = self._gather_visual_inputs(cad, slots, num_tokens)
        if self.pruning is not None:
            num_tokens, token_indices_to_sample, new_cad = self._drop_pruned(
                cad, num_tokens, token_indices_to_sample, new_cad)
        if self._mm_inputs is not None:
            self._counts["visual_tokens_in"] += sum(e.shape[0] for e in self._mm_inputs[0])
        if mrope is not None:
            self._seq_next = self.positions[token_indices_to_sample]
        return num_tokens, token_indices_to_sample, new_cad

    # -- SpecVLM pruning ---------------------------------------------------------------------
    def _decide_pruning(self, req_id: str, state, first: int, end: int) -> None:
        """Choose the kept tokens of every item whose first token is in [first, end)."""
        from lvspec_vllm.drafter.pruning import select_kept
        from lvspec_vllm.relevance.reference import visual_ranges

        keep_ratio, share = self.pruning
        decided = self._pruned.setdefault(req_id, {})
        scores = (self.prompt_attention.prompt_scores or {}).get(req_id)
        changed = False
        for i, f in enumerate(state.mm_features):
            if not first <= f.mm_position.offset < end:
                continue
            changed = True
            runs = visual_ranges([f.mm_position])
            pos = torch.cat([torch.arange(a, b) for a, b in runs.tolist()])
            item = None
            if scores is not None and scores.numel() >= int(pos[-1]) + 1:
                item = scores[pos.to(scores.device)].float()
                item = self._all_reduce(item)
                if float(item.sum()) <= 0:
                    item = None
            kept = select_kept(pos.numel(), keep_ratio, share, item)
            decided[i] = pos[~kept]
            self._counts["pruned_items_scored" if item is not None
                         else "pruned_items_unscored"] += 1
        if changed:  # merged once per decision, not on every decode step
            self._pruned_sorted[req_id] = torch.cat(list(decided.values())).sort().values

    def _all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        # every rank scores with its own heads; all must keep the same tokens
        from vllm.distributed import get_tensor_model_parallel_world_size
        if get_tensor_model_parallel_world_size() == 1:
            return t
        from vllm.distributed import tensor_model_parallel_all_reduce
        return tensor_model_parallel_all_reduce(t.contiguous())

    def _drop_pruned(self, cad, num_tokens, tis, new_cad):
        """Remove pruned video tokens from the first pass and move the rest into the draft's
        compacted sequence (KV slots, sequence lengths, rows and visual embeddings)."""
        from lvspec_vllm.drafter.pruning import compact_layout

        runner = self.runner
        req_ids, firsts = self._pass_requests(cad)
        for gone in [r for r in self._pruned if r not in runner.requests]:
            del self._pruned[gone]
            self._pruned_sorted.pop(gone, None)
        qsl = cad.query_start_loc_cpu.tolist()
        for r, (req_id, first) in enumerate(zip(req_ids, firsts)):
            state = runner.requests[req_id]
            if state.mm_features:
                self._decide_pruning(req_id, state, first, first + qsl[r + 1] - qsl[r])
        pruned = [self._pruned_sorted.get(r) for r in req_ids]
        if all(p is None or p.numel() == 0 for p in pruned):
            return num_tokens, tis, new_cad
        seq_pos = self.positions[:num_tokens].cpu()
        seq_lens = new_cad.seq_lens.cpu()
        keep, draft_pos, draft_lens = compact_layout(seq_pos, new_cad.query_start_loc_cpu,
                                                     seq_lens, pruned)
        # The sampled row stays, so no request loses all its rows. Only a partial prefill's
        # discarded row can sit on a pruned position: its KV lands in the slot the next kept
        # token overwrites, as vLLM's own discarded row does.
        keep[tis.cpu()] = True
        rows = keep.nonzero().squeeze(1)
        n = rows.numel()
        dev_rows = rows.to(self.device)
        self.input_ids[:n] = self.input_ids[:num_tokens][dev_rows]
        if self.uses_mrope:
            self.mrope_positions[:, :n] = self.mrope_positions[:, :num_tokens][:, dev_rows]
        self.positions[:n] = draft_pos[rows].to(self.device)
        # KV slots of the compacted positions in the request's own blocks; padding stays padding
        req = torch.repeat_interleave(torch.arange(len(req_ids)),
                                      torch.diff(new_cad.query_start_loc_cpu))[rows]
        blocks = new_cad.block_table_tensor.cpu()
        pos = draft_pos[rows]
        slot = blocks[req, pos // self.block_size].long() * self.block_size + pos % self.block_size
        old = new_cad.slot_mapping[:num_tokens].cpu()[rows]
        from vllm.v1.spec_decode.utils import PADDING_SLOT_ID
        slot = torch.where(old == PADDING_SLOT_ID, old.long(), slot)
        counts = torch.bincount(req, minlength=len(req_ids))
        q = torch.zeros(len(req_ids) + 1, dtype=new_cad.query_start_loc_cpu.dtype)
        q[1:] = torch.cumsum(counts, 0)
        new_tis = (torch.cumsum(keep.long(), 0) - 1)[tis.cpu()]
        upper = new_cad.seq_lens_cpu_upper_bound
        new_cad = new_cad.replace(
            query_start_loc=q.to(self.device), query_start_loc_cpu=q,
            seq_lens=draft_lens.to(device=self.device, dtype=new_cad.seq_lens.dtype),
            num_actual_tokens=n, max_query_len=int(counts.max()),
            max_seq_len=int(draft_lens.max()),
            slot_mapping=slot.to(device=self.device, dtype=new_cad.slot_mapping.dtype),
            seq_lens_cpu_upper_bound=None if upper is None else upper - (seq_lens - draft_lens),
            positions=None, _num_computed_tokens_cache=None, _token_to_req_indices_cache=None)
        if self._mm_inputs is not None:
            embeds, mask = self._mm_inputs
            vis_kept = keep.to(mask.device)[mask.nonzero().squeeze(1)].to(embeds[0].device)
            self._mm_inputs = ([torch.cat(embeds)[vis_kept]], mask[keep.to(mask.device)])
            self._counts["pruned_visual_tokens"] += int((~vis_kept).sum())
        return n, new_tis.to(device=tis.device, dtype=tis.dtype), new_cad

    def _gather_visual_inputs(self, cad, slots: int, num_tokens: int):
        runner = self.runner
        qsl = cad.query_start_loc_cpu.tolist()
        windows = []
        for r, (req_id, first) in enumerate(zip(*self._pass_requests(cad))):
            windows.append(Window(runner.requests[req_id].mm_features, first,
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

    def _get_positions(self, num_tokens: int):
        if self._rope is not None:  # the model's RoPE positions; self.positions holds the index
            return self._rope[:num_tokens]
        return super()._get_positions(num_tokens)

    def _update_positions_dependent_metadata(self, positions, common_attn_metadata, batch_size,
                                             input_batch_size, block_size):
        if self._rope is not None:  # drafted tokens are text: RoPE advances with the index
            seq = super()._update_positions_dependent_metadata(
                positions, common_attn_metadata, batch_size, input_batch_size, block_size)
            self._rope[:batch_size] = seq + self._rope_delta
            return seq
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
