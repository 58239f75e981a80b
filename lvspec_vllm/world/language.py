"""Captions and answers for the synthetic scenes: anchor words from the ground truth, fillers free.

Every fact about the video is said with one fixed anchor word (a colour, shape, direction, count,
event or background word); everything around it is drawn from many equivalent phrasings, so a
model that describes the video correctly still has real choices to make between fillers. That is
exactly the structure LVSpec exploits: strict where the word is grounded in the video, loose on
the phrasing.

`parse_caption` reads the facts back out of any generated description, and `score` compares two
readings, which gives attribute accuracy against the ground truth and fidelity against another
model's output.
"""

from __future__ import annotations

import itertools
import random
import re

from .scenes import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, Obj, Scene

COUNT_WORDS = ("no", "one", "two")
EVENT_WORDS = ("appears", "disappears")
# Words whose presence in an answer is a fact about the video. Plurals are included because
# "circles" is what a count answer says.
ANCHOR_KINDS = {
    **{w: "colour" for w in COLOURS}, **{w: "background" for w in BACKGROUNDS},
    **{w: "shape" for w in SHAPES}, **{w + "s": "shape" for w in SHAPES},
    **{w: "direction" for w in DIRECTIONS}, **{w: "count" for w in COUNT_WORDS},
    **{w: "event" for w in EVENT_WORDS},
}

DESCRIBE_PROMPTS = ("Describe this video.", "What happens in this video?", "Describe the clip.",
                    "What do you see in the video?")

_VERBS = ("moves", "slides", "travels", "drifts", "glides", "heads")
_DIR = ("{d}", "to the {d}")            # "moves left" / "moves to the left"
_VERT = ("{d}", "{d}ward")              # "moves up" / "moves upward" ("up" stays its own token)
_EVENT = {"appears": ("appears and {v}", "appears, then {v}"),
          "disappears": ("{v} and then disappears", "{v} before it disappears")}
_INTRO = ("", "In this video, ", "In the clip, ", "Here, ", "We can see that ")
_BG_SENTENCE = ("The background is {b}.", "It all happens on a {b} background.",
                "The backdrop is {b}.", "Everything is on a {b} background.")
_BG_PREFIX = ("On a {b} background, ", "Against a {b} backdrop, ")
_COUNT_SENTENCE = {1: ("There is one shape.", "One shape is shown."),
                   2: ("There are two shapes.", "Two shapes are shown.")}


def _direction(rng: random.Random, d: str) -> str:
    forms = _VERT if d in ("up", "down") else _DIR
    return rng.choice(forms).format(d=d)


def _clause(rng: random.Random, o: Obj) -> str:
    motion = f"{rng.choice(_VERBS)} {_direction(rng, o.direction)}"
    if o.event != "none":
        motion = rng.choice(_EVENT[o.event]).format(v=motion)
    return f"a {o.colour} {o.shape} {motion}"


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def describe(scene: Scene, rng: random.Random) -> str:
    objs = list(scene.objects)
    rng.shuffle(objs)       # the order of mention is a filler choice, not a fact
    clauses = [_clause(rng, o) for o in objs]
    if len(clauses) == 1:
        body = clauses[0]
    else:
        body = rng.choice(("{0}, and {1}", "{0}, while {1}", "{0}. Then {1}",
                           "{0}, and meanwhile {1}")).format(*clauses)
    b = scene.background
    parts = []
    if rng.random() < 0.3:
        parts.append(rng.choice(_COUNT_SENTENCE[len(objs)]))
    if rng.random() < 0.4:
        parts.append(rng.choice(_BG_PREFIX).format(b=b) + body + ".")
    else:
        parts.append(_cap(rng.choice(_INTRO) + body) + ".")
        parts.append(rng.choice(_BG_SENTENCE).format(b=b))
    text = " ".join(parts)
    return re.sub(r"(\. )([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def question_answer(scene: Scene, rng: random.Random) -> tuple[str, str]:
    """A short question about the video and a correct answer in one of several phrasings."""
    kind = rng.choice(("colour", "count", "direction", "background"))
    unique = [o for o in scene.objects if scene.count(o.shape) == 1]
    if kind == "colour" and unique:
        o = rng.choice(unique)
        a = rng.choice(("The {s} is {c}.", "It is {c}.", "{C}.")).format(
            s=o.shape, c=o.colour, C=o.colour.capitalize())
        return f"What colour is the {o.shape}?", a
    if kind == "direction":
        o = rng.choice(scene.objects)
        a = rng.choice(("It moves {d}.", "The {c} {s} moves {d}.", "It goes {d}.")).format(
            d=o.direction, c=o.colour, s=o.shape)
        return f"Which way does the {o.colour} {o.shape} move?", a
    if kind == "background":
        b = scene.background
        return "What colour is the background?", rng.choice(
            ("The background is {b}.", "It is {b}.")).format(b=b)
    shape = rng.choice(SHAPES)
    n = scene.count(shape)
    word = COUNT_WORDS[n]
    if n == 1:
        a = rng.choice((f"There is one {shape}.", "One."))
    else:
        a = rng.choice((f"There are {word} {shape}s.", f"{word.capitalize()}."))
    return f"How many {shape}s are there?", a


def anchor_kind(word: str) -> str | None:
    """The kind of fact a word states, or None for a filler word."""
    return ANCHOR_KINDS.get(word.strip().strip(".,?!").lower())


# ---- reading facts back out of a description -------------------------------------------------

def parse_caption(text: str) -> dict:
    """{"background": str|None, "objects": [{"colour", "shape", "direction", "event"}]}."""
    words = re.findall(r"[a-z]+", text.lower())
    background = next((w for i, w in enumerate(words[:-1]) if w in BACKGROUNDS
                       and words[i + 1] in ("background", "backdrop")), None)
    if background is None:  # "The background is black."
        background = next((w for i, w in enumerate(words[2:], 2) if w in BACKGROUNDS
                           and words[i - 2] in ("background", "backdrop")), None)
    starts = [i for i in range(len(words) - 1) if words[i] in COLOURS and words[i + 1] in SHAPES]
    objects = []
    for j, i in enumerate(starts):
        seg = words[i + 2: starts[j + 1] if j + 1 < len(starts) else len(words)]
        direction = next((w.removesuffix("ward") for w in seg
                          if w.removesuffix("ward") in DIRECTIONS), None)
        event = next((w for w in seg if w in EVENT_WORDS), "none")
        objects.append({"colour": words[i], "shape": words[i + 1], "direction": direction,
                        "event": event})
    return {"background": background, "objects": objects}


def truth(scene: Scene) -> dict:
    return {"background": scene.background,
            "objects": [{"colour": o.colour, "shape": o.shape, "direction": o.direction,
                         "event": o.event} for o in scene.objects]}


OBJECT_FIELDS = ("colour", "shape", "direction", "event")


def score(reference: dict, candidate: dict) -> dict[str, tuple[int, int]]:
    """Per attribute, (facts of `reference` that `candidate` states the same way, facts).

    Objects are matched in the order that agrees best (the caption's order of mention is free);
    a missing object gets all its facts wrong, and "count" is right when the number of described
    objects is.
    """
    ref, cand = reference["objects"], candidate["objects"]
    best = None
    # Each reference object gets a distinct described object or none (None: missed).
    for perm in itertools.permutations(list(range(len(cand))) + [None] * len(ref), len(ref)):
        hits = {f: sum(j is not None and ref[i][f] == cand[j][f] for i, j in enumerate(perm))
                for f in OBJECT_FIELDS}
        if best is None or sum(hits.values()) > sum(best.values()):
            best = hits
    out = {f: (best[f], len(ref)) for f in OBJECT_FIELDS}
    out["background"] = (int(reference["background"] == candidate["background"]), 1)
    out["count"] = (int(len(ref) == len(cand)), 1)
    return out


def corpus(seed: int, n: int) -> list[str]:
    """Text of every kind the world produces: the tokenizer is fitted on it."""
    from .scenes import sample_scene

    rng = random.Random(seed)
    lines = list(DESCRIBE_PROMPTS)
    for _ in range(n):
        scene = sample_scene(rng)
        lines.append(describe(scene, rng))
        lines.extend(question_answer(scene, rng))
    return lines
