"""Deferred draft KV (``lvspec_vllm.drafter.lag``): who waits at k = 0, what is recorded, and the
layout of the pass that catches up, on plain tensors."""

import pytest
import torch

from lvspec_vllm.drafter.lag import DraftLag, Row, chunks, may_wait

BS = 8  # block size


def _decode(req_id, first, delta=0):
    return Row(req_id, first, 1, True, delta)


def _step(lag, rows, k, ids):
    """Plan and record one step whose rows hold ``ids`` (one list per row)."""
    qsl = [0]
    for r in ids:
        qsl.append(qsl[-1] + len(r))
    run, wait = lag.plan(rows, k)
    lag.record(rows, wait, qsl, torch.tensor([t for r in ids for t in r], dtype=torch.int32))
    return run, wait, qsl


@pytest.mark.parametrize("row, waits", [
    (Row("a", 10, 1, True), True),           # plain decode
    (Row("a", 15, 1, True), False),          # position 15 fills block [8, 16)
    (Row("a", 16, 1, True), True),           # first slot of the next block
    (Row("a", 10, 5, True), False),          # verifies drafts
    (Row("a", 10, 1, False), False),         # last prompt token (a one-token prefill chunk)
    (Row("a", 0, 12, False), False),         # prefill
])
def test_who_may_wait(row, waits):
    assert may_wait(row, BS) == waits


def test_k_positive_runs_every_row_and_k_zero_defers_decodes():
    lag = DraftLag(BS, 4, "cpu")
    rows = [_decode("a", 9), Row("b", 0, 6, False), _decode("c", 15)]
    assert lag.plan(rows, 4) == ([0, 1, 2], [])
    run, wait, _ = _step(lag, rows, 0, [[7], [1, 2, 3, 4, 5, 6], [9]])
    assert (run, wait) == ([1, 2], [0])
    assert lag.pending["a"].start == 9 and lag.pending["a"].count == 1
    assert lag.counts["deferred_tokens"] == 1


def test_records_accumulate_and_the_catch_up_layout_puts_them_first():
    lag = DraftLag(BS, 4, "cpu")
    # a decodes at 9, 10, 11 with k = 0; b decodes alongside from 3.
    for step, tok in enumerate((70, 71, 72)):
        _step(lag, [_decode("a", 9 + step, delta=-4), _decode("b", 3 + step)], 0,
              [[tok], [40 + step]])
    assert lag.pending["a"].count == 3 and lag.pending["b"].count == 3
    # Next step drafts: a's row is its token at 12, b verifies nothing (1 row at 6).
    rows = [_decode("a", 12, delta=-4), _decode("b", 6)]
    run, _, qsl = _step(lag, rows, 4, [[73], [43]])
    n = 2  # step tokens
    layout = lag.layout(rows, run, qsl, n)
    assert layout.query_start_loc.tolist() == [0, 4, 8]
    assert layout.first == [9, 3]
    assert layout.positions.tolist() == [9, 10, 11, 12, 3, 4, 5, 6]
    ids = torch.cat([torch.tensor([73, 43], dtype=torch.int32), lag.ids.view(-1)])[layout.src]
    assert ids.tolist() == [70, 71, 72, 73, 40, 41, 42, 43]
    # M-RoPE columns: the step's own, then the pending tokens' (position + delta)
    step_mrope = torch.tensor([[112, 6]] * 3)
    extra = (layout.pending_positions + layout.pending_mrope_delta).expand(3, -1)
    mrope = torch.cat([step_mrope, extra], 1)[:, layout.mrope_src]
    assert mrope[0].tolist() == [5, 6, 7, 112, 3, 4, 5, 6]
    assert lag.pending == {} and lag.counts["caught_up_tokens"] == 6
    assert sorted(lag._free) == [0, 1, 2, 3]


def test_a_pass_over_a_subset_keeps_the_rows_order_and_query_lengths():
    lag = DraftLag(BS, 4, "cpu")
    _step(lag, [_decode("a", 5), _decode("b", 20)], 0, [[1], [2]])
    rows = [_decode("a", 6), Row("c", 0, 3, False), _decode("b", 21)]
    run, wait, qsl = _step(lag, rows, 0, [[3], [9, 9, 9], [4]])
    assert run == [1] and wait == [0, 2]
    layout = lag.layout(rows, run, qsl, 5)
    assert layout.first == [0] and layout.query_start_loc.tolist() == [0, 3]
    assert layout.src.tolist() == [1, 2, 3]
    assert lag.pending["a"].count == 2 and lag.pending["b"].count == 2


def test_the_block_filling_step_catches_up_the_whole_block():
    lag = DraftLag(BS, 2, "cpu")
    for pos in range(8, 15):
        run, wait, _ = _step(lag, [_decode("a", pos)], 0, [[pos]])
        assert wait == [0]
    rows = [_decode("a", 15)]
    run, wait, qsl = _step(lag, rows, 0, [[15]])
    assert run == [0] and wait == []
    layout = lag.layout(rows, run, qsl, 1)
    ids = torch.cat([torch.tensor([15], dtype=torch.int32), lag.ids.view(-1)])[layout.src]
    assert ids.tolist() == list(range(8, 16)) == layout.positions.tolist()


def test_a_record_that_does_not_continue_is_dropped():
    lag = DraftLag(BS, 2, "cpu")
    _step(lag, [_decode("a", 9)], 0, [[1]])
    _step(lag, [_decode("a", 10)], 0, [[2]])
    # preempted and resumed: the request restarts from a prefix-cache hit at 8
    run, wait = lag.plan([Row("a", 8, 4, True)], 0)
    assert run == [0] and "a" not in lag.pending
    assert lag.counts["dropped_tokens"] == 2 and len(lag._free) == 2


def test_finished_requests_free_their_slots():
    lag = DraftLag(BS, 2, "cpu")
    _step(lag, [_decode("a", 9), _decode("b", 9)], 0, [[1], [2]])
    assert lag._free == []
    lag.forget({"b"})
    assert set(lag.pending) == {"b"} and len(lag._free) == 1
    _step(lag, [_decode("c", 1), _decode("b", 10)], 0, [[3], [4]])  # c takes a's slot
    assert lag.pending["c"].count == 1


def test_without_a_free_slot_a_request_runs_instead_of_waiting():
    lag = DraftLag(BS, 2, "cpu")
    _step(lag, [_decode("a", 9), _decode("b", 9)], 0, [[1], [2]])
    # a third request (one that outlived its slot holder's preemption, say) finds none free
    run, wait, _ = _step(lag, [_decode("a", 10), _decode("c", 3), _decode("b", 10)], 0,
                         [[1], [5], [2]])
    assert run == [1] and wait == [0, 2]
    assert "c" not in lag.pending


@pytest.mark.parametrize("sizes, capacity, groups", [
    ([3, 3, 3], 6, [[0, 1], [2]]),
    ([7, 1], 6, [[0], [1]]),
    ([1, 1, 1], 100, [[0, 1, 2]]),
    ([], 5, []),
])
def test_chunks(sizes, capacity, groups):
    assert chunks(sizes, capacity) == groups
