"""Training and evaluation examples: a rendered scene, a chat prompt, and the answer's labels."""

from __future__ import annotations

import random

import numpy as np

from . import language, scenes

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
# Held-out scenes come from a seed range training never touches.
HELD_OUT_SEED = 10_000_000


def chat_prompt(question: str) -> str:
    """The text vLLM's chat template produces for one video and one question."""
    return f"<|im_start|>user\n{VIDEO}{question}<|im_end|>\n<|im_start|>assistant\n"


def example(rng: random.Random, describe_share: float = 0.7):
    """(scene, prompt text, answer text); the answer ends with the end-of-turn token."""
    scene = scenes.sample_scene(rng)
    if rng.random() < describe_share:
        question = rng.choice(language.DESCRIBE_PROMPTS)
        answer = language.describe(scene, rng)
    else:
        question, answer = language.question_answer(scene, rng)
    return scene, chat_prompt(question), answer + "<|im_end|>"


def held_out(n: int, seed: int = HELD_OUT_SEED) -> list[scenes.Scene]:
    rng = random.Random(seed)
    return [scenes.sample_scene(rng) for _ in range(n)]


def video_tokens() -> int:
    """Placeholder tokens one video expands to: temporal slots x merged cells."""
    cells = scenes.SIZE // 28
    return scenes.FRAMES // 2 * cells * cells


def text_only(tok, texts: list[str]):
    """What vLLM feeds a text-only draft: the prompt with each video placeholder expanded to the
    video's token count, as plain tokens (no pixels)."""
    expanded = [t.replace("<|video_pad|>", "<|video_pad|>" * video_tokens()) for t in texts]
    enc = tok(expanded, padding=True, return_tensors="pt", add_special_tokens=False)
    # vLLM gives a text-only draft the target's temporal M-RoPE row as its positions
    import torch

    from ..testing import mrope
    from . import models

    n = enc["input_ids"].shape[0]
    patches = scenes.SIZE // 14
    enc["position_ids"] = mrope.text_draft_positions(models.model_config("target", tok), {
        **enc, "mm_token_type_ids": None,
        "video_grid_thw": torch.tensor([[scenes.FRAMES // 2, patches, patches]] * n),
        "second_per_grid_ts": torch.tensor([2 / scenes.FPS] * n)})
    return enc


def batch(processor, items, noise: float = 0.0, seed: int = 0, video: bool = True):
    """Processor outputs for (scene, prompt, answer) items, with labels on the answer only."""
    texts = [p + a for _, p, a in items]
    tok = processor.tokenizer
    if video:
        nrng = np.random.default_rng(seed)
        videos = [scenes.render(s, noise, nrng) for s, _, _ in items]
        enc = processor(text=texts, videos=videos, padding=True, return_tensors="pt",
                        videos_kwargs=dict(video_metadata=[scenes.video_metadata()] * len(items),
                                           do_sample_frames=False))
    else:
        enc = dict(text_only(tok, texts))
    assert tok.padding_side == "right"
    labels = enc["input_ids"].clone()
    labels[enc["attention_mask"] == 0] = -100
    for row, (_, p, a) in enumerate(items):
        n_answer = len(tok(a, add_special_tokens=False)["input_ids"])
        n_real = int(enc["attention_mask"][row].sum())
        # Right padding: the answer is the last n_answer real tokens.
        labels[row, : n_real - n_answer] = -100
    enc["labels"] = labels
    return enc
