"""patches/spec_metadata.py: a step without drafts gets vLLM's own spec-decode metadata, field
for field, without vLLM's general construction; every other step and engine gets vLLM's."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

import lvspec_vllm
from lvspec_vllm.patches.spec_metadata import SpecDecodeMetadataPatch

FIELDS = ("draft_token_ids", "cu_num_draft_tokens", "cu_num_sampled_tokens",
          "target_logits_indices", "bonus_logits_indices", "logits_indices")


def _runner(lvspec: bool, max_tokens: int = 512):
    """What vLLM's method reads of its runner: the scratch aranges, the input ids, the device."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    runner = SimpleNamespace(
        arange_np=np.arange(max_tokens + 1, dtype=np.int64),
        _arange_scratch=np.empty(max_tokens + 1, dtype=np.int64),
        input_ids=SimpleNamespace(gpu=torch.randint(0, 1000, (max_tokens,), dtype=torch.int32)),
        device=torch.device("cpu"),
        drafter=SimpleNamespace(propose_without_inputs=lambda *a: None) if lvspec else None)
    runner._get_cumsum_and_arange = GPUModelRunner._get_cumsum_and_arange.__get__(runner)
    return runner


def _vllms(runner, drafts, cu):
    return SpecDecodeMetadataPatch.original(runner, drafts, cu)


def _ours(runner, drafts, cu):
    return SpecDecodeMetadataPatch.wrapper(SpecDecodeMetadataPatch.original, runner, drafts, cu)


def _batch(rng, n, dtype):
    # decode rows (1 token) and prefill chunks (several), as a step mixes them
    lens = np.where(rng.random(n) < 0.6, 1, rng.integers(2, 40, n))
    return np.cumsum(lens).astype(dtype)


def _assert_equal(a, b):
    assert a.num_draft_tokens == b.num_draft_tokens
    assert a.max_spec_len == b.max_spec_len
    for f in FIELDS:
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and x.device == y.device, f
        assert torch.equal(x, y), f


@pytest.mark.parametrize("dtype", [np.int32, np.int64])
@pytest.mark.parametrize("seed", range(6))
def test_a_step_without_drafts_gets_vllms_metadata(seed, dtype):
    lvspec_vllm.register()
    rng = np.random.default_rng(seed)
    runner = _runner(lvspec=True)
    for n in (1, 2, 5, 16):
        cu = _batch(rng, n, dtype)
        drafts = np.zeros(n, dtype=np.int32)
        _assert_equal(_ours(runner, drafts, cu), _vllms(runner, drafts, cu))


def test_a_step_with_drafts_runs_vllms_method():
    lvspec_vllm.register()
    runner = _runner(lvspec=True)
    cu = np.cumsum([1, 4, 1, 3]).astype(np.int32)
    drafts = np.array([0, 3, 0, 2], dtype=np.int32)
    got = _ours(runner, drafts, cu)
    assert got.num_draft_tokens == [0, 3, 0, 2] and got.draft_token_ids.numel() == 5
    _assert_equal(got, _vllms(runner, drafts, cu))


def test_other_engines_run_vllms_method():
    lvspec_vllm.register()
    calls = []

    def original(self, drafts, cu):
        calls.append((drafts, cu))
        return "vllm"

    runner = _runner(lvspec=False)
    assert SpecDecodeMetadataPatch.wrapper(original, runner, np.zeros(3, np.int32),
                                           np.array([1, 2, 3], np.int32)) == "vllm"
    assert len(calls) == 1
