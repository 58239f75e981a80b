"""Visual attention mass: the reference against an explicit softmax."""

from types import SimpleNamespace

import pytest
import torch

from lvspec_vllm.relevance.reference import (batched_visual_mass, relevance_from_masses,
                                             visual_mass, visual_ranges)


@pytest.mark.parametrize("seed, hq, hkv", [(0, 4, 4), (1, 8, 2), (2, 6, 1), (3, 4, 2)])
def test_mass_equals_explicit_softmax(seed, hq, hkv):
    g = torch.Generator().manual_seed(seed)
    R, N, D = 5, 40, 16
    q = torch.randn(R, hq, D, generator=g)
    k = torch.randn(N, hkv, D, generator=g)
    visual = torch.zeros(N, dtype=torch.bool)
    visual[5:20] = True
    ctx = torch.tensor([36, 37, 38, 39, 40])
    got = visual_mass(q, k, visual, ctx, D ** -0.5)
    for r in range(R):
        for h in range(hq):
            s = (k[: ctx[r], h // (hq // hkv)] @ q[r, h]) * D ** -0.5
            p = torch.softmax(s, dim=0)
            assert torch.isclose(got[r, h], p[visual[: ctx[r]]].sum(), atol=1e-6)


@pytest.mark.parametrize("seed, hq, hkv", [(0, 4, 4), (1, 8, 2), (2, 6, 1), (3, 4, 2)])
def test_batched_mass_equals_the_per_request_reference(seed, hq, hkv):
    """Requests of different lengths and visual layouts, rows in shuffled order, one request
    whose rows see no visual key: row for row what ``visual_mass`` gives per request."""
    g = torch.Generator().manual_seed(seed)
    D = 8
    lengths = [int(x) for x in torch.randint(3, 30, (4,), generator=g)]
    keys = [torch.randn(n, hkv, D, generator=g) for n in lengths]
    visual = [torch.rand(n, generator=g) < 0.4 for n in lengths]
    visual[1][:] = False
    rows, want = [], []
    for b, n in enumerate(lengths):
        ctx = torch.randint(1, n + 1, (int(torch.randint(1, 4, (1,), generator=g)),),
                            generator=g)
        q = torch.randn(len(ctx), hq, D, generator=g)
        want.append(visual_mass(q, keys[b], visual[b], ctx, D ** -0.5))
        rows += [(b, q[i], ctx[i]) for i in range(len(ctx))]
    order = torch.randperm(len(rows), generator=g).tolist()
    padded = torch.nn.utils.rnn.pad_sequence(keys, batch_first=True)
    vis = torch.nn.utils.rnn.pad_sequence(visual, batch_first=True)
    got = batched_visual_mass(torch.stack([rows[i][1] for i in order]), padded, vis,
                              torch.tensor([rows[i][0] for i in order]),
                              torch.stack([rows[i][2] for i in order]), D ** -0.5)
    flat = torch.cat(want)
    assert torch.allclose(got, flat[order], atol=1e-6)
    assert got[[j for j, i in enumerate(order) if rows[i][0] == 1]].eq(0).all()


def test_no_visual_key_in_context_gives_zero():
    q, k = torch.randn(2, 2, 8), torch.randn(10, 2, 8)
    visual = torch.zeros(10, dtype=torch.bool)
    visual[8:] = True
    m = visual_mass(q, k, visual, torch.tensor([5, 10]), 0.3)
    assert m[0].eq(0).all() and (m[1] > 0).all()


def test_relevance_is_the_mean_over_layers_and_heads():
    a, b = torch.tensor([[0.2, 0.4]]), torch.tensor([[0.6, 0.8]])
    assert torch.allclose(relevance_from_masses([a, b]), torch.tensor([0.5]))


def test_visual_ranges_respect_is_embed():
    p1 = SimpleNamespace(offset=3, length=4, is_embed=None)
    p2 = SimpleNamespace(offset=20, length=6,
                         is_embed=torch.tensor([False, True, True, False, True, False]))
    assert visual_ranges([p1, p2]).tolist() == [[3, 7], [21, 23], [24, 25]]


def _scan(offset, mask):
    """Runs of True in ``mask``, by a plain scan."""
    runs, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append([offset + start, offset + i])
            start = None
    return runs


@pytest.mark.parametrize("seed", range(8))
def test_visual_ranges_equal_a_scan_of_the_mask(seed):
    g = torch.Generator().manual_seed(seed)
    places, want = [], []
    offset = 0
    for _ in range(3):
        n = int(torch.randint(0, 40, (1,), generator=g))
        mask = torch.rand(n, generator=g) < [0.1, 0.5, 0.9][seed % 3]
        # vLLM hands a bool tensor; a list must do too
        places.append(SimpleNamespace(offset=offset, length=n,
                                      is_embed=mask.tolist() if seed % 2 else mask))
        want += _scan(offset, mask.tolist())
        offset += n + 5
    got = visual_ranges(places)
    assert got.dtype == torch.int32 and got.shape == (len(want), 2)
    assert got.tolist() == want


def test_visual_ranges_of_nothing_and_of_full_masks():
    assert visual_ranges([]).shape == (0, 2)
    full = SimpleNamespace(offset=7, length=3, is_embed=torch.ones(3, dtype=torch.bool))
    empty = SimpleNamespace(offset=20, length=3, is_embed=torch.zeros(3, dtype=torch.bool))
    assert visual_ranges([full, empty]).tolist() == [[7, 10]]


def test_capture_builds_a_requests_visual_runs_once_and_forgets_them(monkeypatch):
    """The runs are read on every step for every visual request; they are built once per
    request (a long video's mask is thousands of entries) and dropped when it leaves."""
    from lvspec_vllm.relevance import capture as capture_module

    calls = []

    def counting(places, device="cpu"):
        calls.append(len(places))
        return visual_ranges(places, device)

    monkeypatch.setattr(capture_module, "visual_ranges", counting)
    video = SimpleNamespace(mm_position=SimpleNamespace(offset=1, length=4, is_embed=None))
    live = {r: SimpleNamespace(mm_features=[video], num_prompt_tokens=6) for r in ("a", "b")}
    batch = SimpleNamespace(req_ids=["a", "b"], num_tokens_no_spec=torch.tensor([7, 7]))
    runner = SimpleNamespace(requests=live, input_batch=batch)
    cap = capture_module.RelevanceCapture(runner, {"layers.0.attn": 0})
    cap.first_layer = 0
    hq, d = 2, 4
    for step in range(3):  # two decode rows a step, positions 6, 7, 8
        meta = SimpleNamespace(num_actual_tokens=2, query_start_loc=torch.tensor([0, 1, 2]),
                               seq_lens=torch.tensor([7 + step, 7 + step]))
        cap.observe("layers.0.attn", torch.randn(2, hq * d), torch.randn(2, hq * d), meta,
                    1.0, hq, hq, d)
    assert calls == [1, 1]
    assert set(cap._visual) == {"a", "b"}
    del live["a"]
    batch.req_ids = ["b"]
    meta = SimpleNamespace(num_actual_tokens=1, query_start_loc=torch.tensor([0, 1]),
                           seq_lens=torch.tensor([10]))
    cap.observe("layers.0.attn", torch.randn(1, hq * d), torch.randn(1, hq * d), meta,
                1.0, hq, hq, d)
    assert set(cap._visual) == {"b"} and calls == [1, 1]
    assert cap._keys[("b", 0)].shape[0] >= 10 and ("a", 0) not in cap._keys
