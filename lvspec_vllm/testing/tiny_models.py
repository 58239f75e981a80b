"""Tiny random-weight checkpoints for tests and the demo: built offline, deterministic, cached.

No model hub is involved. One shared byte-level BPE tokenizer carries the Qwen special tokens and a
chat template; every checkpoint uses it, so targets and drafts share a vocabulary as vLLM's
draft_model requires.

    qwen25vl/              Qwen2.5-VL target (4 text layers, GQA 4q/2kv heads, 2-block vision tower)
    qwen25vl_draft/        smaller Qwen2.5-VL draft (1 text layer, 1-block vision tower)
    qwen2_draft/           text-only Qwen2 draft (1 layer)
    qwen25vl_aligned/      text-only Qwen2 holding exactly the Qwen2.5-VL target's language model
    llava_ov/              LLaVA-OneVision target (SigLIP 2 layers + Qwen2 2 layers)
    llava_ov_draft/        smaller LLaVA-OneVision draft (SigLIP 1 layer + Qwen2 1 layer)
    llava_ov_aligned/      text-only Qwen2 holding exactly the LLaVA-OneVision target's language model
    qwen25vl_vl_aligned/   the Qwen2.5-VL target's own weights as a draft that sees the video
    llava_ov_vl_aligned/   the LLaVA-OneVision target's own weights as a draft that sees the video

The "aligned" drafts agree with their target wherever the target does not look at the video, which
makes them the exactness tests' drafts: most draft tokens are accepted, so the accept path is
exercised as much as the reject path. The "vl_aligned" drafts agree with their target everywhere,
video included, once they see the video.

    lvspec-tiny-models [--out DIR] [--force]     (prints the directory)
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import shutil
import tempfile
from pathlib import Path

# Bump when anything below changes the files produced; the cache is keyed by it.
BUILDER_VERSION = 2
SEED = 0
VOCAB_SIZE = 2048  # config vocab_size: >= len(tokenizer), a multiple of 64
# Larger than the usual 0.02 so that random logits have clear winners: greedy decoding of a tiny
# random model is then not decided by rounding noise, and exactness tests compare real decisions.
INIT_RANGE = 0.08

QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>",
    "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>", "<|box_end|>",
    "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
    "<image>", "<video>",  # LLaVA-OneVision's placeholders
]

QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content or 'video_url' in content %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image_url' in content %}<image>\n"
    "{% elif content['type'] == 'video' or 'video_url' in content %}<video>\n"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Prompts in the two families' chat formats (what vLLM sees after the template).
QWEN_VIDEO_PROMPT = ("<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
                     "Describe this video.<|im_end|>\n<|im_start|>assistant\n")
QWEN_IMAGE_PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
                     "What is in the picture?<|im_end|>\n<|im_start|>assistant\n")
LLAVA_VIDEO_PROMPT = "<|im_start|>user\n<video>\nDescribe this video.<|im_end|>\n<|im_start|>assistant\n"
LLAVA_IMAGE_PROMPT = "<|im_start|>user\n<image>\nWhat is in the picture?<|im_end|>\n<|im_start|>assistant\n"


def default_dir() -> Path:
    root = os.environ.get("LVSPEC_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "lvspec_vllm")
    return Path(root) / f"tiny-models-v{BUILDER_VERSION}"


def _build_tokenizer(path: Path):
    rnd = random.Random(SEED)
    words = ("the a video image frame shows moving red green blue cat dog person car tree sky water "
             "describe what happens in this clip picture left right up down fast slow one two three "
             "assistant user system hello yes no it is are and of to with on").split()
    lines = [" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 20))) + rnd.choice(".?!")
             for _ in range(5000)]
    lines += ["".join(chr(rnd.randint(32, 126)) for _ in range(40)) for _ in range(500)]
    fast = qwen_bpe_tokenizer(lines, 1500, QWEN_CHAT_TEMPLATE, 32768)
    fast.save_pretrained(path)
    assert len(fast) <= VOCAB_SIZE, len(fast)
    return fast, {t: fast.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}


def qwen_bpe_tokenizer(lines: list[str], bpe_vocab: int, chat_template: str,
                       model_max_length: int):
    """A byte-level BPE fitted on `lines`, plus the Qwen special tokens and a chat template."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=bpe_vocab, min_frequency=2, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(lines, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token=None,
                                   model_max_length=model_max_length,
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = chat_template
    return fast


def generation_config(path: Path, ids: dict) -> None:
    gen = {"bos_token_id": ids["<|endoftext|>"],
           "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
           "pad_token_id": ids["<|endoftext|>"], "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(gen, indent=1))


def _qwen25vl(path: Path, tok, ids, *, layers: int, hidden: int, heads: int, kv_heads: int,
              vision_depth: int, seed: int) -> None:
    import torch
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration,
                              Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor)

    half = hidden // heads // 2
    hw = (half - half // 4) // 2
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=4096, rms_norm_eps=1e-6, initializer_range=INIT_RANGE,
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
            # M-RoPE sections (temporal, height, width) sum to head_dim / 2.
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                             "mrope_section": [half - 2 * hw, hw, hw]},
        ),
        vision_config=dict(
            depth=vision_depth, hidden_size=64, intermediate_size=128, num_heads=2, in_channels=3,
            patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
            out_hidden_size=hidden, fullatt_block_indexes=[vision_depth - 1], tokens_per_second=2,
            initializer_range=INIT_RANGE,
        ),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False, initializer_range=INIT_RANGE,
    )
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    Qwen2_5_VLForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(path)
    # At most 16 patches of 28x28 per frame: a 64x64 frame becomes 2x2 merged tokens.
    px = dict(min_pixels=28 * 28, max_pixels=28 * 28 * 16, patch_size=14, merge_size=2,
              temporal_patch_size=2)
    Qwen2_5_VLProcessor(image_processor=Qwen2VLImageProcessor(**px), tokenizer=tok,
                        video_processor=Qwen2VLVideoProcessor(**px),
                        chat_template=QWEN_CHAT_TEMPLATE).save_pretrained(path)
    generation_config(path, ids)


def _llava_ov(path: Path, tok_dir: Path, ids, *, layers: int, hidden: int, vision_layers: int,
              seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                              LlavaOnevisionVideoProcessor, PreTrainedTokenizerFast)

    img, patch = 56, 14
    cfg = LlavaOnevisionConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=64, intermediate_size=128,
                           num_hidden_layers=vision_layers, num_attention_heads=2, image_size=img,
                           patch_size=patch),
        text_config=dict(model_type="qwen2", vocab_size=VOCAB_SIZE, hidden_size=hidden,
                         intermediate_size=hidden * 2, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=ids["<|im_end|>"],
                         initializer_range=INIT_RANGE, tie_word_embeddings=False),
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        vision_feature_select_strategy="full", vision_feature_layer=-1,
        image_grid_pinpoints=[[img, img], [img, 2 * img], [2 * img, img], [2 * img, 2 * img]],
        vision_aspect_ratio="anyres_max_9", tie_word_embeddings=False,
    )
    cfg.architectures = ["LlavaOnevisionForConditionalGeneration"]
    torch.manual_seed(seed)
    LlavaOnevisionForConditionalGeneration(cfg).to(torch.bfloat16).save_pretrained(path)
    # transformers saves the SigLIP tower as `vision_tower.embeddings...`; vLLM (like the llava-hf
    # checkpoints) expects `vision_tower.vision_model.embeddings...`.
    st = path / "model.safetensors"
    sd = {(("vision_tower.vision_model." + k[len("vision_tower."):])
           if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model.")
           else k): v for k, v in load_file(st).items()}
    save_file(sd, st, metadata={"format": "pt"})
    size = {"height": img, "width": img}
    ltok = PreTrainedTokenizerFast.from_pretrained(tok_dir)
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, crop_size=size,
                                                     image_grid_pinpoints=cfg.image_grid_pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size, crop_size=size),
        tokenizer=ltok, num_image_tokens=(img // patch) ** 2, vision_feature_select_strategy="full",
        chat_template=LLAVA_CHAT_TEMPLATE, image_token="<image>", video_token="<video>",
    ).save_pretrained(path)
    generation_config(path, ids)


def _qwen2_text(path: Path, tok, ids, *, layers: int, hidden: int, heads: int, kv_heads: int,
                seed: int) -> None:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB_SIZE, hidden_size=hidden, intermediate_size=hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, max_position_embeddings=4096,
                      initializer_range=INIT_RANGE, bos_token_id=ids["<|endoftext|>"],
                      eos_token_id=ids["<|im_end|>"], tie_word_embeddings=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    torch.manual_seed(seed)
    Qwen2ForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    generation_config(path, ids)


def _aligned_text_draft(target: Path, path: Path, tok, ids) -> None:
    """A text-only Qwen2 whose weights are exactly the target's language model."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, Qwen2Config, Qwen2ForCausalLM

    tc = AutoConfig.from_pretrained(target).text_config
    rope_theta = (getattr(tc, "rope_parameters", None) or {}).get("rope_theta", 1000000.0)
    cfg = Qwen2Config(vocab_size=tc.vocab_size, hidden_size=tc.hidden_size,
                      intermediate_size=tc.intermediate_size,
                      num_hidden_layers=tc.num_hidden_layers,
                      num_attention_heads=tc.num_attention_heads,
                      num_key_value_heads=tc.num_key_value_heads,
                      max_position_embeddings=tc.max_position_embeddings, rms_norm_eps=tc.rms_norm_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                      bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
                      tie_word_embeddings=False)
    cfg.architectures = ["Qwen2ForCausalLM"]
    lm = {}
    for k, v in load_file(target / "model.safetensors").items():
        if k in ("lm_head.weight", "language_model.lm_head.weight"):
            lm["lm_head.weight"] = v
            continue
        for prefix in ("model.language_model.", "language_model.model.", "model."):
            if k.startswith(prefix):
                rest = k[len(prefix):]
                if rest.split(".")[0] in ("embed_tokens", "layers", "norm"):
                    lm["model." + rest] = v
                break
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16)
    model.load_state_dict(lm, strict=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    generation_config(path, ids)


def build(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok, ids = _build_tokenizer(out / "tok")
    _qwen25vl(out / "qwen25vl", tok, ids, layers=4, hidden=128, heads=4, kv_heads=2,
              vision_depth=2, seed=SEED)
    _qwen25vl(out / "qwen25vl_draft", tok, ids, layers=1, hidden=64, heads=2, kv_heads=2,
              vision_depth=1, seed=SEED + 1)
    _qwen2_text(out / "qwen2_draft", tok, ids, layers=1, hidden=64, heads=2, kv_heads=2,
                seed=SEED + 2)
    _aligned_text_draft(out / "qwen25vl", out / "qwen25vl_aligned", tok, ids)
    _llava_ov(out / "llava_ov", out / "tok", ids, layers=2, hidden=128, vision_layers=2,
              seed=SEED + 3)
    _llava_ov(out / "llava_ov_draft", out / "tok", ids, layers=1, hidden=64, vision_layers=1,
              seed=SEED + 4)
    _aligned_text_draft(out / "llava_ov", out / "llava_ov_aligned", tok, ids)
    for family in ("qwen25vl", "llava_ov"):
        shutil.copytree(out / family, out / f"{family}_vl_aligned")


def ensure_tiny_models(out: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Return a directory holding every tiny checkpoint, building it once (process-safe)."""
    out = Path(out) if out else default_dir()
    done = out / ".complete"
    if done.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # concurrent test workers build once
        if done.exists() and not force:
            return out
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            with contextlib.redirect_stdout(None):
                build(tmp)
            (tmp / ".complete").write_text(json.dumps({"builder_version": BUILDER_VERSION}))
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help=f"directory (default {default_dir()})")
    ap.add_argument("--force", action="store_true", help="rebuild even if cached")
    args = ap.parse_args(argv)
    print(ensure_tiny_models(args.out, force=args.force))


if __name__ == "__main__":
    main()
