"""The benchmark world: generator, captions, parser, tokenizer and training labels."""

import random

import numpy as np
import pytest

from lvspec_vllm.world import data, language, models, scenes


def _scenes(n, seed=0):
    rng = random.Random(seed)
    return [scenes.sample_scene(rng) for _ in range(n)]


def test_generator_is_deterministic():
    a, b = _scenes(50, seed=3), _scenes(50, seed=3)
    assert a == b
    assert all(np.array_equal(scenes.render(x), scenes.render(y)) for x, y in zip(a, b))
    assert _scenes(50, seed=4) != a


def test_scenes_cover_the_attribute_space():
    many = _scenes(3000)
    objs = [o for s in many for o in s.objects]
    assert {o.colour for o in objs} == set(scenes.COLOURS)
    assert {o.shape for o in objs} == set(scenes.SHAPES)
    assert {o.direction for o in objs} == set(scenes.DIRECTIONS)
    assert {o.event for o in objs} == set(scenes.EVENTS)
    assert {s.background for s in many} == set(scenes.BACKGROUNDS)
    assert {len(s.objects) for s in many} == {1, 2}


def _cell(x, y):
    c = scenes.OBJECT // 2
    return (x + c) // 28, (y + c) // 28


@pytest.mark.parametrize("scene", _scenes(300, seed=7))
def test_render_matches_the_truth(scene):
    video = scenes.render(scene)
    assert video.shape == (scenes.FRAMES, scenes.SIZE, scenes.SIZE, 3)
    for o in scene.objects:
        for f in range(scenes.FRAMES):
            x, y = o.corner(f)
            assert 0 <= x and x + scenes.OBJECT <= scenes.SIZE
            assert 0 <= y and y + scenes.OBJECT <= scenes.SIZE
            # The shape's centre pixel has the object's colour exactly when it is visible
            # (colours are distinct within a scene).
            centre = tuple(video[f, y + scenes.OBJECT * 2 // 3, x + scenes.OBJECT // 2])
            assert (centre == scenes.COLOURS[o.colour]) == o.visible(f)
        # Motion crosses a merged 28 px cell: direction is visible to the language model.
        first, last = _cell(*o.corner(0)), _cell(*o.corner(scenes.FRAMES - 1))
        dx, dy = scenes.DIRECTIONS[o.direction]
        assert np.sign(last[0] - first[0]) == dx and np.sign(last[1] - first[1]) == dy


@pytest.mark.parametrize("scene", [s for s in _scenes(400, seed=8)
                                   if len(s.objects) == 1 and s.objects[0].shape == "square"])
def test_streak_trails_behind_the_head(scene):
    """Each frame shows the direction: the square's colour, dimmed, just behind its head, and
    plain background just ahead of it."""
    (o,) = scene.objects
    video = scenes.render(scene).astype(float)
    bg = np.array(scenes.BACKGROUNDS[scene.background], float)
    colour = np.array(scenes.COLOURS[o.colour], float)
    dx, dy = scenes.DIRECTIONS[o.direction]
    seen = [f for f in range(scenes.FRAMES) if o.visible(f)]
    for f in seen[1:]:
        x, y = o.corner(f)
        mid = scenes.OBJECT // 2
        # One pixel past the trailing and the leading edge, on the square's middle line.
        if dx:
            behind = (y + mid, x - 1 if dx > 0 else x + scenes.OBJECT)
            ahead = (y + mid, x + scenes.OBJECT if dx > 0 else x - 1)
        else:
            behind = (y - 1 if dy > 0 else y + scenes.OBJECT, x + mid)
            ahead = (y + scenes.OBJECT if dy > 0 else y - 1, x + mid)
        share = (video[f][behind] - bg) @ (colour - bg) / ((colour - bg) @ (colour - bg))
        assert 0.3 < share < 0.95, (f, share)
        if all(0 <= c < scenes.SIZE for c in ahead):
            assert (video[f][ahead] == bg).all()


@pytest.mark.parametrize("seed", range(400))
def test_caption_states_the_truth_and_parses_back(seed):
    rng = random.Random(seed)
    scene = scenes.sample_scene(rng)
    text = language.describe(scene, rng)
    parsed = language.parse_caption(text)
    for field, (hit, total) in language.score(language.truth(scene), parsed).items():
        assert hit == total, (field, text)


def test_captions_vary_but_anchors_do_not():
    scene = _scenes(1, seed=11)[0]
    texts = {language.describe(scene, random.Random(i)) for i in range(200)}
    assert len(texts) > 50
    for t in texts:
        anchors = sorted(w for w in t.replace(".", " ").replace(",", " ").split()
                         if language.anchor_kind(w) in ("colour", "shape"))
        assert anchors == sorted([o.colour for o in scene.objects] +
                                 [o.shape for o in scene.objects])


def test_score_counts_wrong_and_missing_facts():
    truth = {"background": "black", "objects": [
        {"colour": "red", "shape": "circle", "direction": "left", "event": "none"},
        {"colour": "blue", "shape": "square", "direction": "up", "event": "appears"}]}
    said = language.parse_caption("A blue square appears and moves down. The background is gray.")
    s = language.score(truth, said)
    assert s["colour"] == (1, 2) and s["shape"] == (1, 2) and s["event"] == (1, 2)
    assert s["direction"] == (0, 2) and s["background"] == (0, 1) and s["count"] == (0, 1)


@pytest.mark.parametrize("seed", range(200))
def test_answers_are_true(seed):
    rng = random.Random(seed)
    scene = scenes.sample_scene(rng)
    q, a = language.question_answer(scene, rng)
    words = a.lower().strip(".").split()
    if q.startswith("How many"):
        shape = q.split()[2][:-1]
        assert language.COUNT_WORDS[scene.count(shape)] in words
    elif q.startswith("Which way"):
        colour = q.split()[4]
        o = next(o for o in scene.objects if o.colour == colour)
        assert o.direction in words
    elif "background" in q:
        assert scene.background in words
    else:
        shape = q.split()[-1].strip("?")
        o = next(o for o in scene.objects if o.shape == shape)
        assert o.colour in words


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return models.build_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenizer_keeps_anchor_words_whole(tokenizer):
    for word in language.ANCHOR_KINDS:
        assert len(tokenizer.tokenize(" " + word)) == 1, word
    caption = language.describe(_scenes(1)[0], random.Random(0))
    assert len(tokenizer(caption)["input_ids"]) < 40
    assert tokenizer.decode(tokenizer(caption)["input_ids"]) == caption


def test_labels_cover_exactly_the_answer(tokenizer):
    tokenizer.padding_side = "right"
    proc = models.processor(tokenizer)
    rng = random.Random(5)
    items = [data.example(rng) for _ in range(6)]
    enc = data.batch(proc, items, noise=3.0, seed=1)
    grid = enc["video_grid_thw"]
    # 8 frames of 56x56: 4 temporal slots of 4x4 patches, one second apart.
    assert grid.tolist() == [[4, 4, 4]] * 6
    assert enc["second_per_grid_ts"].tolist() == [1.0] * 6
    for row, (_, _, answer) in enumerate(items):
        ids = enc["input_ids"][row][enc["labels"][row] != -100]
        assert tokenizer.decode(ids) == answer


def test_text_only_ids_are_what_the_processor_expands(tokenizer):
    tokenizer.padding_side = "right"
    proc = models.processor(tokenizer)
    rng = random.Random(9)
    items = [data.example(rng) for _ in range(4)]
    with_video = data.batch(proc, items)
    text = data.batch(proc, items, video=False)
    assert text["input_ids"].tolist() == with_video["input_ids"].tolist()
    assert text["labels"].tolist() == with_video["labels"].tolist()


def test_text_draft_positions_are_the_targets_temporal_row(tokenizer):
    from lvspec_vllm.testing import mrope

    tokenizer.padding_side = "right"
    proc = models.processor(tokenizer)
    rng = random.Random(3)
    items = [data.example(rng) for _ in range(4)]
    with_video = data.batch(proc, items)
    text = data.batch(proc, items, video=False)
    want = mrope.text_draft_positions(models.model_config("target", tokenizer), with_video)
    mask = with_video["attention_mask"].bool()
    assert text["position_ids"][mask].tolist() == want[mask].tolist()


def test_reference_positions_continue_after_the_largest_vision_position(tokenizer):
    from lvspec_vllm.testing import mrope

    proc = models.processor(tokenizer)
    enc = proc(text=[data.chat_prompt("Describe this video.")],
               videos=[scenes.render(_scenes(1)[0])], return_tensors="pt",
               videos_kwargs=dict(video_metadata=[scenes.video_metadata()],
                                  do_sample_frames=False))
    cfg = models.model_config("target", tokenizer)
    pos = mrope.text_draft_positions(cfg, enc)[0].tolist()
    video = (enc["input_ids"][0] == cfg.video_token_id).nonzero()[:, 0].tolist()
    # 4 temporal slots one second apart at 2 tokens per second: t = start + 0, 2, 4, 6
    start = pos[video[0]]
    assert sorted(set(pos[i] for i in video)) == [start, start + 2, start + 4, start + 6]
    # the text after the video goes on from the largest position used, as in vLLM
    after = video[-1] + 1
    assert pos[after] == start + 6 + 1
    assert pos[after:] == list(range(pos[after], pos[after] + len(pos) - after))
