"""Patch: ``layer.impl.forward`` of the target's selected attention layers (vLLM 0.32, 0.33).

Why: vLLM never materialises attention weights, and the CPU backend's KV cache is packed in an
ISA-specific layout. Every attention backend is called as
``impl.forward(layer, query, key, value, kv_cache, attn_metadata, output=...)`` from the
``unified_attention_with_output`` custom op, which runs eagerly between compiled pieces (and on
CPU in every compile mode), so an instance-level wrapper on the selected layers sees each step's
post-RoPE query and key. Only the target's layers are wrapped (the draft's are prefixed
``draft_model.``), and only after ``load_model``, when the layers exist. Warm-up calls carry no
metadata and are passed straight through.
"""

from __future__ import annotations

import functools

from lvspec_vllm.relevance.capture import RelevanceCapture, select_layers


def install(runner, capture: RelevanceCapture, relevance_layers: tuple) -> None:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    layers = get_layers_from_vllm_config(runner.vllm_config, Attention)
    capture.layers = select_layers(list(layers), relevance_layers)
    capture.first_layer = min(capture.layers.values())
    for name in capture.layers:
        impl = layers[name].impl
        if getattr(impl.forward, "__lvspec_capture__", False):
            continue  # load_model ran twice (e.g. reload): keep one wrapper
        impl.forward = _wrap(impl.forward, capture, name, impl)


def _wrap(forward, capture: RelevanceCapture, name: str, impl):
    @functools.wraps(forward)
    def wrapped(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs):
        if attn_metadata is not None:
            capture.observe(name, query, key, attn_metadata, impl.scale, impl.num_heads,
                            impl.num_kv_heads, impl.head_size)
        return forward(layer, query, key, value, kv_cache, attn_metadata, *args, **kwargs)

    wrapped.__lvspec_capture__ = True
    return wrapped
