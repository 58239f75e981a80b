"""Deterministic synthetic videos and images for tests and the demo."""

from __future__ import annotations

import numpy as np


def synthetic_frames(seed: int, frames: int = 8, size: int = 64) -> np.ndarray:
    """[frames, size, size, 3] uint8: a coloured square moving right over a dark noisy field."""
    rng = np.random.default_rng(seed)
    video = rng.integers(0, 60, size=(frames, size, size, 3), dtype=np.uint8)
    colour = rng.integers(100, 256, size=3, dtype=np.uint8)
    for t in range(frames):
        x = (seed * 7 + 6 * t) % (size - 16)
        video[t, 8:24, x:x + 16] = colour
    return video


def synthetic_video(seed: int, frames: int = 8, size: int = 64, fps: float = 2.0):
    """(frames, metadata): the form ``vllm.LLM`` accepts offline (a bare array is refused)."""
    meta = {"total_num_frames": frames, "fps": fps, "duration": frames / fps,
            "video_backend": "opencv", "frames_indices": list(range(frames)),
            "do_sample_frames": False}
    return synthetic_frames(seed, frames, size), meta


def synthetic_image(seed: int, size: int = 56):
    from PIL import Image

    rng = np.random.default_rng(1000 + seed)
    return Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8))


def write_mp4(path: str, frames: np.ndarray, fps: float = 2.0) -> str:
    """Encode RGB frames as an mp4 (OpenCV, mp4v), the format the HTTP tests send."""
    import cv2

    h, w = frames.shape[1:3]
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (w, h))
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    return path
