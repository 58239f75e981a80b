"""Cold requests: a request first scheduled in a step with k = 0 never runs the draft.

Deferring decode rows (``lag.py``) leaves one cost of speculation in k = 0 steps: the draft's
prefill of every new request (its vision encoder and its forward over the prompt), paid whether
or not the request ever drafts. Under load, where k = 0 is chosen, most requests never do. With
``draft_cold_requests`` a request admitted in a k = 0 step is *cold* for as long as the worker
holds it: the draft never runs for it, and it gets no drafts when later steps draft for the
others (``patches/drafts.py`` empties its list before the scheduler sees it). Its outputs are the
target's own; only the speed-up is given up, for that request.

One hazard: prefix caching. A cold request fills KV blocks with the target's KV only; once full
they are cached, and a later request that reuses one would find no draft KV there. The blocks a
cold request computed are therefore marked, and a request whose reused prefix holds a marked
block is cold as well. A block is unmarked when a request that runs the draft computes it again.

With ``auto_k``, once k = 0 is chosen its explorations need rows that draft, or k > 0 would
never be measured again. They make their own: at a batch size at k = 0 they run k = 1 for four
steps in sixteen, and a request first scheduled in one of those steps is warm
(``lvspec_vllm/auto_k.py``).

Plain Python over host block ids, so the rules are tested without an engine
(``tests/test_cold.py``); ``proposer.py`` calls ``step`` once per propose call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lvspec_vllm.drafter.lag import Row


class ColdRequests:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.cold: set[str] = set()
        self.marked: set[int] = set()  # draft-KV block ids holding a cold request's tokens
        self._checked: dict[str, int] = {}  # warm request: blocks of its prefix checked so far
        self._last_step: dict[str, int] = {}
        self._marked_upto: dict[str, int] = {}  # cold request: its blocks marked, [0, upto)
        self._step = 0
        self.counts = {"cold_requests": 0, "cold_prefix_hits": 0}

    def step(self, rows: Sequence[Row], k: int,
             block_ids: Callable[[int, int], Sequence[int]]) -> list[bool]:
        """Whether each row of the step is cold. ``block_ids(i, n)`` gives the first ``n``
        draft-KV block ids of row ``i``'s request."""
        self._step += 1
        bs = self.block_size
        cold = []
        for i, row in enumerate(rows):
            req = row.req_id
            last = self._last_step.get(req)
            self._last_step[req] = self._step
            if last is None and k == 0:
                self._make_cold(req)
            elif last != self._step - 1 and req not in self.cold:
                # new, resumed after preemption or left out of a step: its block table may
                # be new, so its reused prefix is checked from the start
                self._checked[req] = 0
            if req not in self.cold and self.marked:
                done, upto = self._checked[req], row.first // bs
                if upto > done:
                    if any(b in self.marked for b in block_ids(i, upto)[done:]):
                        self.counts["cold_prefix_hits"] += 1
                        self._make_cold(req)
                    else:
                        self._checked[req] = upto
            is_cold = req in self.cold
            if row.num_tokens and (is_cold or self.marked):
                lo, hi = row.first // bs, -(-(row.first + row.num_tokens) // bs)
                if is_cold:
                    # a cold request in the step before marked its blocks up to ``upto``; its
                    # block table only grows while it keeps running
                    upto = self._marked_upto.get(req, 0) if last == self._step - 1 else 0
                    if hi > max(lo, upto):
                        self.marked.update(block_ids(i, hi)[max(lo, upto):])
                    self._marked_upto[req] = hi
                else:  # the draft computes these now (or, deferred, before the block fills)
                    self.marked.difference_update(block_ids(i, hi)[lo:])
            cold.append(is_cold)
        return cold

    def _make_cold(self, req: str) -> None:
        self.cold.add(req)
        self.counts["cold_requests"] += 1
        self._checked.pop(req, None)

    def forget(self, live) -> None:
        """Drop the requests not in ``live`` (finished or aborted); marked blocks stay marked."""
        # set operations over the keys: this runs every step, over every live request
        for table in (self._last_step, self._checked, self._marked_upto):
            for req in table.keys() - live:
                del table[req]
        self.cold.intersection_update(live)
