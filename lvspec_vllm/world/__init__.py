"""The benchmark world: synthetic captioned videos and the small model pair trained on them.

    scenes.py     videos with ground truth (shapes, colours, motion, events)
    language.py   captions and answers: anchor words from the truth, fillers free; the parser
    models.py     fitted tokenizer, processor and Qwen2.5-VL configurations (target, draft)
    data.py       training examples and labels
    train.py      lvspec-train-world: CPU training, resumable
    evaluate.py   held-out attribute accuracy under HF transformers
    checkpoints/  the trained pair (target, video-aware draft, text-only draft) and its card
"""

from pathlib import Path


def checkpoints_dir() -> Path:
    """The committed trained checkpoints: target/, draft/ (sees the video), text_draft/."""
    return Path(__file__).parent / "checkpoints"
