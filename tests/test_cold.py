"""Cold requests (drafter/cold.py): who never runs the draft, and the prefix-cache rule."""

import pytest

from lvspec_vllm.drafter.cold import ColdRequests
from lvspec_vllm.drafter.lag import Row

BS = 4


def _row(req, first, n=1, decoding=True):
    return Row(req, first, n, decoding)


class _Tables:
    """Block ids per request, as a worker's block table holds them."""

    def __init__(self, **tables):
        self.tables = tables

    def fn(self, rows):
        return lambda i, n: self.tables[rows[i].req_id][:n]


def _step(cold, rows, k, tables):
    return cold.step(rows, k, tables.fn(rows))


def test_a_request_admitted_at_k0_stays_cold_and_one_admitted_at_k4_stays_warm():
    c, t = ColdRequests(BS), _Tables(a=[1, 2, 3], b=[4, 5, 6])
    assert _step(c, [_row("a", 0, 6, False)], 0, t) == [True]
    assert _step(c, [_row("a", 6), _row("b", 0, 5, False)], 4, t) == [True, False]
    for first in range(7, 10):  # k changes; neither changes side
        for k in (0, 4):
            assert _step(c, [_row("a", first), _row("b", first - 1)], k, t) == [True, False]
    assert c.cold == {"a"}
    assert c.counts == {"cold_requests": 1, "cold_prefix_hits": 0}


def test_the_blocks_a_cold_request_computes_are_marked():
    c, t = ColdRequests(BS), _Tables(a=[7, 8, 9])
    _step(c, [_row("a", 0, 6, False)], 0, t)  # positions 0-5: blocks 7 and 8
    assert c.marked == {7, 8}
    _step(c, [_row("a", 6, 2)], 0, t)  # positions 6-7, still block 8
    assert c.marked == {7, 8}
    _step(c, [_row("a", 8)], 0, t)
    assert c.marked == {7, 8, 9}


@pytest.mark.parametrize("first, hit", [(4, True), (8, True), (3, False)])
def test_a_warm_request_reusing_a_marked_block_turns_cold(first, hit):
    # b reuses a's cached blocks [7, 8] up to `first` (a prefix hit), then computes its own
    c, t = ColdRequests(BS), _Tables(a=[7, 8, 9], b=[7, 8, 20, 21])
    _step(c, [_row("a", 0, 9, False)], 0, t)
    assert _step(c, [_row("b", first, 2, False)], 4, t) == [hit]
    assert c.counts["cold_prefix_hits"] == int(hit)


def test_a_block_a_warm_request_computes_again_is_unmarked():
    c, t = ColdRequests(BS), _Tables(a=[7, 8], b=[7, 30])
    _step(c, [_row("a", 0, 8, False)], 0, t)
    c.forget(set())  # a finished; its blocks stay marked (cached)
    assert c.marked == {7, 8}
    # block 7 was evicted and handed to b, which computes it from scratch with the draft
    assert _step(c, [_row("b", 0, 6, False)], 4, t) == [False]
    assert c.marked == {8}


def test_an_unmarked_prefix_is_checked_once_and_again_after_an_absence():
    calls = []
    c = ColdRequests(BS)
    tables = {"a": [1, 2], "b": [3, 4, 5, 6, 7]}

    def block_ids(rows):
        def fn(i, n):
            calls.append((rows[i].req_id, n))
            return tables[rows[i].req_id][:n]
        return fn

    rows = [_row("a", 0, 5, False)]
    c.step(rows, 0, block_ids(rows))  # a cold: marks 1, 2
    calls.clear()
    rows = [_row("b", 8, 2, False)]
    assert c.step(rows, 4, block_ids(rows)) == [False]
    assert ("b", 2) in calls  # its reused prefix: blocks 0-1
    calls.clear()
    rows = [_row("b", 10)]
    c.step(rows, 4, block_ids(rows))
    assert calls == [("b", 3)]  # only the blocks it computes (to unmark): its prefix is known
    c.step([_row("a", 5)], 0, block_ids([_row("a", 5)]))  # b left out of this step
    # b resumes after preemption; its recomputed table now reuses a's block 2
    tables["b"] = [2, 9, 5]
    rows = [_row("b", 4, 7, False)]
    assert c.step(rows, 4, block_ids(rows)) == [True]


def test_forget_drops_finished_requests_and_a_reused_id_is_new():
    c, t = ColdRequests(BS), _Tables(a=[1, 2])
    _step(c, [_row("a", 0, 3, False)], 0, t)
    c.forget({"other"})
    assert c.cold == set()
    # the same id, a new request admitted while drafting (its blocks are new)
    t.tables["a"] = [10, 11]
    assert _step(c, [_row("a", 0, 3, False)], 4, t) == [False]


def test_nothing_is_looked_up_for_warm_rows_while_no_block_is_marked():
    c = ColdRequests(BS)

    def fail(i, n):
        raise AssertionError("looked up")

    for first in range(20):
        assert c.step([_row("a", first), _row("b", first)], 4, fail) == [False, False]


def test_a_cold_request_looks_up_its_blocks_only_when_it_enters_a_new_one():
    # and again in full after an absence (preempted: its block table may be new)
    c, t = ColdRequests(BS), _Tables(a=[7, 8, 9, 10])
    looked = []

    def fn(i, n):
        looked.append(n)
        return t.tables["a"][:n]

    c.step([_row("a", 0, 5, False)], 0, fn)  # positions 0-4: blocks 7 and 8
    for first in range(5, 10):
        c.step([_row("a", first)], 0, fn)
    assert looked == [2, 3]  # at position 8, block 9
    assert c.marked == {7, 8, 9}
    t.tables["a"] = [7, 8, 40]  # back after a preemption that freed its last block
    c.step([], 0, fn)  # (a step without it)
    c.step([_row("a", 10)], 4, fn)  # (k = 4: it stays cold)
    assert c.marked == {7, 8, 9, 40}
    c.step([_row("a", 11)], 0, fn)
    assert looked == [2, 3, 3]


def test_a_schedule_that_never_drafts_takes_the_option_without_complaint():
    # every request is cold already; "needs draft_catch_up" would name the wrong cause
    from types import SimpleNamespace

    from lvspec_vllm.drafter import LVSpecDrafter

    drafter = SimpleNamespace(never_drafts=True, _catch_up=False, _cold=False)
    LVSpecDrafter.enable_cold_requests(drafter)
    assert not drafter._cold
    drafter = SimpleNamespace(never_drafts=False, _catch_up=False, _cold=False)
    with pytest.raises(RuntimeError, match="draft_catch_up"):
        LVSpecDrafter.enable_cold_requests(drafter)
