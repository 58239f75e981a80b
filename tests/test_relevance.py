"""Visual attention mass: the reference against an explicit softmax."""

from types import SimpleNamespace

import pytest
import torch

from lvspec_vllm.relevance.reference import relevance_from_masses, visual_mass, visual_ranges


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
