"""Synthetic videos with ground truth: coloured shapes moving over a plain background.

Sized to what a small Qwen2.5-VL can see. A frame is 56x56 pixels, i.e. 4x4 patches of 14 px that
the vision tower merges into 2x2 tokens of 28 px; 8 frames at 2 fps pair up (temporal patch 2)
into 4 temporal slots one second apart, so each slot gets its own temporal M-RoPE index (16
video tokens in all). An object is 20 px and travels 28 px over the clip, from one merged cell
into the next, so direction is visible at the resolution the language model receives. Objects
that appear (or disappear) are drawn in the second (or first) half only, i.e. in two whole
temporal slots.

A moving object leaves a fading streak at its earlier positions in the clip (a long exposure's
motion blur), so each frame shows which way it is heading: the bright head is at the leading end.
World v2 drew the object alone; after 6,400 steps the target named direction on 50 % of held-out
objects, as it had to compare one object's merged cell across temporal slots (the vision tower
attends within a slot only). v3 adds the streak; nothing else changed.

(World v1 used 84x84 frames with 22 px objects: after 3,000 steps of batch 16 the target still
named object colours, shapes and directions at chance; v2 makes objects a larger share of the
frame and the video 16 tokens instead of 36.)
"""

from __future__ import annotations

import dataclasses
import random

import numpy as np

FRAMES = 8
FPS = 2.0
SIZE = 56          # frame height and width, a multiple of the 28 px merged cell
OBJECT = 20        # object bounding box side
TRAVEL = 28        # pixels covered from the first frame to the last
MARGIN = 2
TRAIL_ALPHA = 0.6   # the streak's opacity at the previous position ...
TRAIL_DECAY = 0.75  # ... and its fall-off per frame further back

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 40), "blue": (40, 70, 230),
    "yellow": (235, 215, 20), "purple": (150, 40, 190), "orange": (245, 135, 20),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128)}
SHAPES = ("circle", "square", "triangle")
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
EVENTS = ("none", "appears", "disappears")


@dataclasses.dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    direction: str
    event: str          # "none", "appears" (second half only) or "disappears" (first half only)
    x0: int             # top-left corner in the first frame
    y0: int

    def corner(self, frame: int) -> tuple[int, int]:
        dx, dy = DIRECTIONS[self.direction]
        step = round(TRAVEL * frame / (FRAMES - 1))
        return self.x0 + dx * step, self.y0 + dy * step

    def visible(self, frame: int) -> bool:
        half = FRAMES // 2
        return {"none": True, "appears": frame >= half, "disappears": frame < half}[self.event]


@dataclasses.dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[Obj, ...]

    def count(self, shape: str) -> int:
        return sum(o.shape == shape for o in self.objects)


def _place(rng: random.Random, direction: str) -> tuple[int, int]:
    dx, dy = DIRECTIONS[direction]
    free = SIZE - OBJECT - 2 * MARGIN          # room for the corner along one axis
    along = rng.randint(0, free - TRAVEL)      # the whole path must stay inside the frame
    across = rng.randint(0, free)
    x = along if dx > 0 else free - along if dx < 0 else across
    y = along if dy > 0 else free - along if dy < 0 else across
    return x + MARGIN, y + MARGIN


def _overlap(a: Obj, b: Obj) -> bool:
    for f in range(FRAMES):
        if not (a.visible(f) and b.visible(f)):
            continue
        (ax, ay), (bx, by) = a.corner(f), b.corner(f)
        if abs(ax - bx) < OBJECT + 2 and abs(ay - by) < OBJECT + 2:
            return True
    return False


def sample_scene(rng: random.Random) -> Scene:
    """One or two objects whose paths never overlap (so nothing is hidden)."""
    background = rng.choice(sorted(BACKGROUNDS))
    n = rng.choice((1, 1, 2, 2, 2))
    while True:
        objects: list[Obj] = []
        colours = rng.sample(sorted(COLOURS), n)   # distinct colours: "the red one" is unique
        for colour in colours:
            direction = rng.choice(sorted(DIRECTIONS))
            event = rng.choices(EVENTS, weights=(6, 2, 2))[0]
            objects.append(Obj(colour, rng.choice(SHAPES), direction, event,
                               *_place(rng, direction)))
        if n == 1 or not _overlap(objects[0], objects[1]):
            return Scene(background, tuple(objects))


def _mask(shape: str) -> np.ndarray:
    yy, xx = np.mgrid[0:OBJECT, 0:OBJECT] + 0.5
    if shape == "square":
        return np.ones((OBJECT, OBJECT), bool)
    if shape == "circle":
        r = OBJECT / 2
        return (xx - r) ** 2 + (yy - r) ** 2 <= r * r
    # Upward triangle: apex at the top centre, base along the bottom row.
    return np.abs(xx - OBJECT / 2) <= yy / 2


MASKS = {s: _mask(s) for s in SHAPES}


def render(scene: Scene, noise: float = 0.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 frames [FRAMES, SIZE, SIZE, 3]; `noise` is a pixel std for training augmentation."""
    video = np.empty((FRAMES, SIZE, SIZE, 3), np.float32)
    video[:] = BACKGROUNDS[scene.background]
    for f in range(FRAMES):
        frame = video[f]
        # Streaks first, oldest position first, so that every head is drawn whole on top.
        for o in scene.objects:
            if not o.visible(f):
                continue
            colour = np.asarray(COLOURS[o.colour], np.float32)
            for g in range(f):
                if o.visible(g):
                    alpha = TRAIL_ALPHA * TRAIL_DECAY ** (f - 1 - g)
                    x, y = o.corner(g)
                    patch = frame[y:y + OBJECT, x:x + OBJECT]
                    m = MASKS[o.shape]
                    patch[m] = (1 - alpha) * patch[m] + alpha * colour
        for o in scene.objects:
            if o.visible(f):
                x, y = o.corner(f)
                frame[y:y + OBJECT, x:x + OBJECT][MASKS[o.shape]] = COLOURS[o.colour]
    if noise:
        video += (rng or np.random.default_rng()).normal(0.0, noise, video.shape)
    return np.clip(video, 0, 255).round().astype(np.uint8)


def video_metadata() -> dict:
    """What the HF processor and vLLM need to give the frames their real timestamps."""
    return {"fps": FPS, "total_num_frames": FRAMES, "duration": FRAMES / FPS,
            "frames_indices": list(range(FRAMES)), "video_backend": "opencv"}
