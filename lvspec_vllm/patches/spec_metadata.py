"""Patch: ``vllm.v1.worker.gpu_model_runner.GPUModelRunner._calc_spec_decode_metadata`` (vLLM
0.32, 0.33).

Why: vLLM 0.32 builds spec-decode metadata in every step of a speculative engine, a step with no
drafts included (its ``_prepare_inputs`` no longer takes the plain path when nothing was
drafted). With LVSpec's k = 0 steps (``num_speculative_tokens_per_batch_size``, ``auto_k``)
most steps can be such steps, and the general construction (two cumsum-and-arange passes, a
repeat, five host-to-device copies and two gathers of the input ids) costs a speculative engine
about 2 % of a small model's step on the CPU (docs/benchmarks.md, s26) for metadata whose every
field is known without them: each request samples one row, its last scheduled token. For a step
with no drafts this hook builds that metadata directly; it is field for field what vLLM's
method returns (``tests/test_spec_metadata.py`` compares the two). Any step with a draft runs
vLLM's method unchanged, and so does every engine that is not LVSpec's.
"""

from __future__ import annotations

import numpy as np
import torch

from lvspec_vllm.patches import Patch


def zero_draft_metadata(cu_num_scheduled_tokens: np.ndarray, device, token_dtype: torch.dtype):
    """The spec-decode metadata of a step in which no request has drafts."""
    from vllm.utils.torch_utils import async_tensor_h2d
    from vllm.v1.spec_decode.metadata import SpecDecodeMetadata

    n = len(cu_num_scheduled_tokens)
    # vLLM's dtypes: the counts' cumsums are int32, the logits indices follow the scheduled
    # tokens' cumsum, the (empty) draft ids the runner's input ids
    index_dtype = torch.from_numpy(cu_num_scheduled_tokens[:0]).dtype
    return SpecDecodeMetadata(
        draft_token_ids=torch.empty(0, dtype=token_dtype, device=device),
        num_draft_tokens=[0] * n,
        cu_num_draft_tokens=torch.zeros(n, dtype=torch.int32, device=device),
        cu_num_sampled_tokens=torch.arange(1, n + 1, dtype=torch.int32, device=device),
        target_logits_indices=torch.empty(0, dtype=torch.int32, device=device),
        bonus_logits_indices=torch.arange(n, dtype=torch.int32, device=device),
        logits_indices=async_tensor_h2d(cu_num_scheduled_tokens - 1, device=device,
                                        dtype=index_dtype),
    )


class SpecDecodeMetadataPatch(Patch):
    target_module = "vllm.v1.worker.gpu_model_runner"
    target_owner = "GPUModelRunner"
    target_attr = "_calc_spec_decode_metadata"

    @staticmethod
    def wrapper(original, self, num_draft_tokens, cu_num_scheduled_tokens, *args, **kwargs):
        if (args or kwargs or num_draft_tokens.any()
                or not hasattr(getattr(self, "drafter", None), "propose_without_inputs")):
            return original(self, num_draft_tokens, cu_num_scheduled_tokens, *args, **kwargs)
        return zero_draft_metadata(cu_num_scheduled_tokens, self.device, self.input_ids.gpu.dtype)
