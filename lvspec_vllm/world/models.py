"""Tokenizer, processor and model configurations of the trained world pair.

The tokenizer is a byte-level BPE fitted on the world's own text, so every anchor word is one
token (checked), with the Qwen special tokens and chat template of the tiny checkpoints. Target
and draft are both Qwen2.5-VL: the draft is the same architecture at a fraction of the size, and
its language model can also be exported alone as a text-only Qwen2 draft.
"""

from __future__ import annotations

from pathlib import Path

from ..testing.tiny_models import (QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, generation_config,
                                   qwen_bpe_tokenizer)
from . import language, scenes

TOKENIZER_SEED = 1234
VOCAB_SIZE = 1024   # config vocab_size: >= len(tokenizer), a multiple of 64

# "text_draft" is a text-only Qwen2 with the draft's language-model shape. It is trained on the
# very token sequences vLLM feeds a text-only draft (the video placeholders as plain tokens), so
# it learns the captions' wording but has to guess every visual word.
SIZES = {
    # text hidden, layers, heads, kv heads; vision hidden, depth
    "target": dict(hidden=192, layers=4, heads=4, kv_heads=2, vision_hidden=128, vision_depth=2),
    "draft": dict(hidden=96, layers=2, heads=2, kv_heads=1, vision_hidden=64, vision_depth=1),
}
TEXT_ONLY = {"text_draft": "draft"}  # text-only role: the VL role whose text shape it takes

# The tiny checkpoints' Qwen template without the default system turn: ten fewer tokens per
# training sequence, and nothing the world's questions need.
_SYSTEM_TURN = ("{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
                "You are a helpful assistant.<|im_end|>\n{% endif %}")
CHAT_TEMPLATE = QWEN_CHAT_TEMPLATE.replace(_SYSTEM_TURN, "")

# Frames keep their size (56x56: 2x2 merged tokens per temporal slot).
PIXELS = dict(min_pixels=scenes.SIZE * scenes.SIZE, max_pixels=scenes.SIZE * scenes.SIZE,
              patch_size=14, merge_size=2, temporal_patch_size=2)


def build_tokenizer(path: Path):
    lines = language.corpus(TOKENIZER_SEED, 4000) + ["user", "assistant"]
    fast = qwen_bpe_tokenizer(lines, VOCAB_SIZE - 64, CHAT_TEMPLATE, 4096)
    for word in language.ANCHOR_KINDS:
        pieces = fast.tokenize(" " + word)
        assert len(pieces) == 1, f"anchor word {word!r} is not one token: {pieces}"
    assert len(fast) <= VOCAB_SIZE, len(fast)
    fast.save_pretrained(path)
    return fast


def special_ids(tok) -> dict[str, int]:
    return {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}


def model_config(role: str, tok):
    from transformers import Qwen2_5_VLConfig

    s = SIZES[role]
    ids = special_ids(tok)
    half = s["hidden"] // s["heads"] // 2
    hw = (half - half // 4) // 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=s["hidden"], intermediate_size=s["hidden"] * 2,
            num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
            num_key_value_heads=s["kv_heads"], max_position_embeddings=4096, rms_norm_eps=1e-6,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "mrope_section": [half - 2 * hw, hw, hw]},
        ),
        vision_config=dict(
            depth=s["vision_depth"], hidden_size=s["vision_hidden"],
            intermediate_size=s["vision_hidden"] * 2, num_heads=max(2, s["vision_hidden"] // 32),
            in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
            window_size=112, out_hidden_size=s["hidden"],
            fullatt_block_indexes=[s["vision_depth"] - 1], tokens_per_second=2,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    return cfg


def text_config(role: str, tok):
    """A text-only Qwen2 with the language-model shape of `role` (the text-only draft)."""
    from transformers import Qwen2Config

    text = model_config(role, tok).text_config.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "rms_norm_eps", "bos_token_id", "eos_token_id", "pad_token_id")
    cfg = Qwen2Config(**{k: text[k] for k in keep}, tie_word_embeddings=False,
                      rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    cfg.architectures = ["Qwen2ForCausalLM"]
    return cfg


def processor(tok):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    return Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**PIXELS), tokenizer=tok,
                               video_processor=Qwen2VLVideoProcessor(**PIXELS),
                               chat_template=CHAT_TEMPLATE)


def write_generation_config(path: Path, tok) -> None:
    generation_config(path, special_ids(tok))
