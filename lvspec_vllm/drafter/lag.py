"""Deferred draft KV: at k = 0 a decoding request's draft pass waits, and catches up later.

vLLM's draft-model proposer runs one draft forward even in a step that drafts nothing (k = 0), so
that the draft's KV cache is complete when a later step drafts again. At the batch sizes where
k = 0 is chosen that pass is all that speculation still costs. Here a decoding request's k = 0
step only records its token (on the device, no sync); the next draft pass that includes the
request processes the recorded tokens first, in the same batched forward, ahead of the step's own
rows. Three rules keep the draft's cache exactly what the eager pass would have left:

* **Only plain decode rows wait**: one scheduled token, prompt done, nothing to verify. Their
  token is the step's input and their position is known on the host.
* **A request catches up no later than the step that fills a KV block.** Prefix caching shares
  full blocks; a request that reuses one must find the draft's KV in it, as it finds the
  target's. The deferred tokens therefore never leave the request's last, partial block.
* **A record that does not end where the request now starts is dropped** (preemption, a
  recomputed prefix): that step's own rows rewrite those positions anyway.

``DraftLag`` holds the records; ``Layout`` is one draft pass over a subset of the step's requests
with their recorded tokens in front, as host-side index tensors. Both are plain torch, so the
rules are tested without an engine (``tests/test_draft_lag.py``); ``proposer.py`` moves the
step's tensors through them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch


class Row(NamedTuple):
    """One request of the step, as the scheduler laid it out (a tuple: built for every row of
    every step that plans)."""

    req_id: str
    first: int  # sequence position of the first scheduled token
    num_tokens: int  # scheduled tokens (with the drafts it verifies, if any)
    decoding: bool  # the prompt is done
    mrope_delta: int = 0  # M-RoPE position minus sequence position for text after the prompt


@dataclass
class Pending:
    slot: int  # row of DraftLag.ids
    start: int  # sequence position of the first recorded token
    count: int

    @property
    def end(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class Layout:
    """One draft pass over some of the step's rows (batch order), each with its pending tokens
    first.

    ``src`` indexes ``cat(step token ids, DraftLag.ids.view(-1))`` and ``mrope_src`` indexes
    ``cat(step M-RoPE columns, the pending tokens' M-RoPE columns)``; both are host tensors."""

    query_start_loc: torch.Tensor  # [pass rows + 1] int32
    first: list[int]  # sequence position of each pass row's first token
    positions: torch.Tensor  # [num_tokens] sequence positions
    src: torch.Tensor  # [num_tokens]
    mrope_src: torch.Tensor  # [num_tokens]
    pending_positions: torch.Tensor  # [num pending tokens] sequence positions
    pending_mrope_delta: torch.Tensor  # [num pending tokens]

    @property
    def num_tokens(self) -> int:
        return int(self.query_start_loc[-1])


def may_wait(row: Row, block_size: int) -> bool:
    """Whether the row's draft pass may be deferred at k = 0."""
    return row.decoding and row.num_tokens == 1 and (row.first + 1) % block_size != 0


class DraftLag:
    def __init__(self, block_size: int, max_reqs: int, device: torch.device | str):
        self.block_size = block_size
        self.device = device
        self.ids: torch.Tensor | None = None  # [max_reqs, block_size], the step ids' dtype
        self.max_reqs = max_reqs
        self.pending: dict[str, Pending] = {}
        self._free = list(range(max_reqs - 1, -1, -1))
        self.counts = {"deferred_tokens": 0, "caught_up_tokens": 0, "dropped_tokens": 0}

    def plan(self, rows: list[Row], k: int) -> tuple[list[int], list[int]]:
        """(rows that run the draft this step, rows that wait), in batch order."""
        for row in rows:
            p = self.pending.get(row.req_id)
            if p is not None and p.end != row.first:
                self._drop(row.req_id, dropped=True)
        if k > 0:
            return list(range(len(rows))), []
        run, wait = [], []
        free = len(self._free)  # a request without a record needs a slot to wait
        for i, row in enumerate(rows):
            waits = may_wait(row, self.block_size) and (row.req_id in self.pending or free > 0)
            if waits and row.req_id not in self.pending:
                free -= 1
            (wait if waits else run).append(i)
        return run, wait

    def record(self, rows: list[Row], wait: list[int], query_start_loc: list[int],
               step_ids: torch.Tensor) -> None:
        """Store the waiting rows' input tokens: one device scatter, no sync."""
        if not wait:
            return
        if self.ids is None:
            self.ids = torch.zeros(self.max_reqs, self.block_size, dtype=step_ids.dtype,
                                   device=self.device)
        slots, cols, src = [], [], []
        for i in wait:
            row = rows[i]
            p = self.pending.get(row.req_id)
            if p is None:
                p = self.pending[row.req_id] = Pending(self._free.pop(), row.first, 0)
            slots.append(p.slot)
            cols.append(p.count)
            src.append(query_start_loc[i])
            p.count += 1
        self.counts["deferred_tokens"] += len(wait)
        index = torch.tensor([slots, cols, src], dtype=torch.long).to(self.device,
                                                                      non_blocking=True)
        self.ids[index[0], index[1]] = step_ids[index[2]]

    def layout(self, rows: list[Row], run: list[int], query_start_loc: list[int],
               num_step_tokens: int) -> Layout:
        """The pass over ``run`` with each row's pending tokens first; the records are taken."""
        qsl, first, positions, src, mrope_src = [0], [], [], [], []
        pend_pos, pend_delta = [], []
        for i in run:
            row = rows[i]
            a, b = query_start_loc[i], query_start_loc[i + 1]
            p = self.pending.get(row.req_id)
            n = p.count if p is not None else 0
            if n:
                base = p.slot * self.block_size
                src.extend(range(num_step_tokens + base, num_step_tokens + base + n))
                mrope_src.extend(range(num_step_tokens + len(pend_pos),
                                       num_step_tokens + len(pend_pos) + n))
                pend_pos.extend(range(p.start, p.end))
                pend_delta.extend([row.mrope_delta] * n)
                self._drop(row.req_id)
                self.counts["caught_up_tokens"] += n
            src.extend(range(a, b))
            mrope_src.extend(range(a, b))
            positions.extend(range(row.first - n, row.first + b - a))
            first.append(row.first - n)
            qsl.append(qsl[-1] + n + b - a)
        return Layout(query_start_loc=torch.tensor(qsl, dtype=torch.int32),
                      first=first, positions=torch.tensor(positions, dtype=torch.long),
                      src=torch.tensor(src, dtype=torch.long),
                      mrope_src=torch.tensor(mrope_src, dtype=torch.long),
                      pending_positions=torch.tensor(pend_pos, dtype=torch.long),
                      pending_mrope_delta=torch.tensor(pend_delta, dtype=torch.long))

    def lagging(self, rows: list[Row], run: list[int]) -> list[int]:
        return [i for i in run if rows[i].req_id in self.pending]

    def pending_tokens(self, rows: list[Row], run: list[int]) -> int:
        return sum(self.pending[rows[i].req_id].count for i in run
                   if rows[i].req_id in self.pending)

    def forget(self, live) -> None:
        """Free the records of requests not in ``live`` (finished or aborted)."""
        for req_id in [r for r in self.pending if r not in live]:
            self._drop(req_id)

    def discard(self, req_id: str) -> None:
        """Free a live request's record whose tokens the draft will never need."""
        self._drop(req_id, dropped=True)

    def _drop(self, req_id: str, dropped: bool = False) -> None:
        p = self.pending.pop(req_id)
        if dropped:
            self.counts["dropped_tokens"] += p.count
        self._free.append(p.slot)


def chunks(sizes: list[int], capacity: int) -> list[list[int]]:
    """Split indices 0..len(sizes)-1, in order, into groups whose sizes sum to <= capacity
    (a single item over capacity gets a group of its own)."""
    groups, cur, total = [], [], 0
    for i, s in enumerate(sizes):
        if cur and total + s > capacity:
            groups.append(cur)
            cur, total = [], 0
        cur.append(i)
        total += s
    if cur:
        groups.append(cur)
    return groups


# CommonAttentionMetadata fields with one entry per request (whichever this vLLM has), and those
# that describe the target's own rows, which a catch-up pass does not have.
_PER_REQUEST = ("seq_lens", "block_table_tensor", "seq_lens_cpu_upper_bound", "is_prefilling",
                "req_idx", "dcp_local_seq_lens", "dcp_local_seq_lens_cpu_upper_bound",
                "encoder_seq_lens", "encoder_seq_lens_cpu", "rswa_prefix_lens",
                "replayssm_decode_base_cpu")
_TARGET_ROWS = ("positions", "logits_indices_padded", "num_logits_indices",
                "max_logits_per_req", "mm_req_doc_ranges", "_num_computed_tokens_cache",
                "_token_to_req_indices_cache")


def subset_metadata(cad, index: torch.Tensor, layout: Layout, device):
    """vLLM's CommonAttentionMetadata for the pass: the requests ``index`` of the step, with the
    layout's query lengths (sequence lengths are unchanged: the deferred tokens were counted as
    computed). The slot mapping is left empty: a draft model's first pass recomputes it from the
    positions (``needs_extra_input_slots``, checked by ``enable_catch_up``), and an empty one
    fails loudly if anything read it first."""
    fields = {}
    for name in _PER_REQUEST:
        value = getattr(cad, name, None)
        if value is not None:
            fields[name] = value[index.to(value.device)] if isinstance(value, torch.Tensor) \
                else value[index.numpy()]
    for name in _TARGET_ROWS:
        if getattr(cad, name, None) is not None:
            fields[name] = None
    qsl = layout.query_start_loc
    lens = torch.diff(qsl)
    seq_lens_cpu = cad.seq_lens_cpu_upper_bound
    return cad.replace(
        query_start_loc=qsl.to(device), query_start_loc_cpu=qsl,
        num_reqs=len(lens), num_actual_tokens=layout.num_tokens,
        max_query_len=int(lens.max()),
        max_seq_len=cad.max_seq_len if seq_lens_cpu is None
        else int(seq_lens_cpu[index].max()),
        slot_mapping=cad.slot_mapping[:0], **fields)
