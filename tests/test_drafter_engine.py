"""A draft that sees the video, inside vllm.LLM on CPU: exactness and what seeing the video buys.

The "vl_aligned" drafts are the targets' own weights: once they see the video they agree with the
target everywhere, so in strict mode every draft token is accepted. The same weights run
text-only (the "aligned" drafts: the target's language model alone) guess the visual words.
"""

import json

import pytest

from conftest import assert_same_tokens

pytestmark = pytest.mark.engine


def _acceptance(run) -> float:
    m = run["metrics"]
    return m["vllm:spec_decode_num_accepted_tokens"] / m["vllm:spec_decode_num_draft_tokens"]


def _video_runs(runs, family):
    """The target alone, and with its own weights as a draft that sees the video."""
    base = runs(f"{family}-base-video", "--family", family, "--only", "video")
    seeing = runs(f"{family}-vl-aligned-video", "--family", family, "--only", "video",
                  "--draft", f"{family}_vl_aligned", "--k", "4")
    return base, seeing


@pytest.mark.parametrize("family", ["qwen25vl", "llava_ov"])
def test_a_draft_that_sees_the_video_is_accepted_everywhere(runs, family):
    base, seeing = _video_runs(runs, family)
    blind = runs(f"{family}-aligned-video", "--family", family, "--only", "video",
                 "--draft", f"{family}_aligned", "--k", "4")
    assert_same_tokens(base, seeing)
    assert_same_tokens(base, blind)
    (w,) = seeing["workers"]
    print(f"{family} video prompts: acceptance with the video {_acceptance(seeing):.3f}, "
          f"text-only {_acceptance(blind):.3f}; drafter {w}")
    # the draft encoded each video itself and fed its rows at the placeholders
    assert w["drafter"] == "LVSpecDrafter"
    assert w["drafter_encoded_items"] == len(base["outputs"])
    assert w["drafter_visual_tokens_in"] > 0
    assert w["drafter_draft_us"] > 0  # its own clock ran
    assert _acceptance(seeing) == 1.0
    assert _acceptance(blind) < 0.9


def test_video_drafts_under_chunked_prefill_and_preemption(runs):
    """The mixed batch (text, image, videos of 4 and 8 frames), prompts split over several steps,
    and a KV cache too small for the batch: vLLM preempts and recomputes. The aligned video draft
    is still accepted everywhere (its KV and positions stayed in step with the target's); the
    smaller Qwen2.5-VL draft (other weights, its drafts rejected) leaves the output exact."""
    base = runs("qwen25vl-base", "--family", "qwen25vl")
    tight = ("--k", "4", "--num-gpu-blocks", "7", "--max-num-batched-tokens", "48")
    aligned = runs("qwen25vl-vl-aligned-tight", "--family", "qwen25vl",
                   "--draft", "qwen25vl_vl_aligned", *tight)
    small = runs("qwen25vl-vl-draft-tight", "--family", "qwen25vl",
                 "--draft", "qwen25vl_draft", *tight)
    for run in (aligned, small):
        assert_same_tokens(base, run)
        assert run["metrics"]["vllm:num_preemptions"] > 0
        (w,) = run["workers"]
        assert w["drafter_encoded_items"] >= 4  # 3 videos and an image (again after preemption)
        print(f"acceptance {_acceptance(run):.3f}, preemptions "
              f"{run['metrics']['vllm:num_preemptions']}, {w}")
    assert _acceptance(aligned) == 1.0
    assert small["workers"][0]["draft_tokens"] > 0


def test_video_draft_under_tensor_parallel_2(runs):
    """float32: vLLM's TP=2 rounds differently from TP=1 in bfloat16 even without speculation."""
    base = runs("qwen25vl-base-fp32", "--family", "qwen25vl", "--dtype", "float32")
    tp2 = runs("qwen25vl-vl-aligned-tp2", "--family", "qwen25vl", "--dtype", "float32",
               "--draft", "qwen25vl_vl_aligned", "--k", "4", "--tp", "2")
    assert_same_tokens(base, tp2)
    assert sorted(w["tp_rank"] for w in tp2["workers"]) == [0, 1]
    assert {w["drafter_encoded_items"] for w in tp2["workers"]} == {4}
    assert _acceptance(tp2) == 1.0


# -- SpecVLM pruning: the draft sees a share of each video's tokens ------------------------------
def _pruning(ratio, share=0.4):
    return ("--no-prefix-caching", "--lvspec-options",
            json.dumps({"draft_pruning": True, "draft_keep_ratio": ratio,
                        "draft_stage1_share": share}))


def test_pruning_at_keep_ratio_one_is_unpruned_drafting(runs):
    _, seeing = _video_runs(runs, "qwen25vl")
    kept_all = runs("qwen25vl-vl-aligned-video-keep1", "--family", "qwen25vl", "--only",
                    "video", "--draft", "qwen25vl_vl_aligned", "--k", "4", *_pruning(1.0))
    assert_same_tokens(seeing, kept_all)
    for key in ("vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens"):
        assert kept_all["metrics"][key] == seeing["metrics"][key]
    (w,), (w0,) = kept_all["workers"], seeing["workers"]
    assert w["drafter_pruned_visual_tokens"] == 0
    assert w["drafter_visual_tokens_in"] == w0["drafter_visual_tokens_in"]


@pytest.mark.parametrize("family", ["qwen25vl", "llava_ov"])
def test_pruning_to_a_tenth_of_the_video_stays_exact(runs, family):
    base, seeing = _video_runs(runs, family)
    pruned = runs(f"{family}-vl-aligned-video-keep0.1", "--family", family, "--only", "video",
                  "--draft", f"{family}_vl_aligned", "--k", "4", *_pruning(0.1))
    assert_same_tokens(base, pruned)
    (w,), (w0,) = pruned["workers"], seeing["workers"]
    total, items = w0["drafter_visual_tokens_in"], len(base["outputs"])
    kept = w["drafter_visual_tokens_in"]
    print(f"{family}: the draft processed {kept} of {total} visual tokens "
          f"({w['drafter_pruned_visual_tokens']} pruned); acceptance {_acceptance(pruned):.3f} "
          f"(unpruned {_acceptance(seeing):.3f})")
    assert kept + w["drafter_pruned_visual_tokens"] == total
    assert 0.1 * total <= kept <= 0.1 * total + items  # ceil(0.1 n) per video
    # every video's question came in the same step: stage I had the target's scores
    assert w["drafter_pruned_items_scored"] == items and w["drafter_pruned_items_unscored"] == 0


def test_pruned_drafts_under_chunked_prefill_and_preemption(runs):
    """Videos split over prefill chunks (a chunk may hold only pruned tokens, or the video without
    its question: stage II alone), and preemption recomputing pruned requests."""
    base = runs("qwen25vl-base", "--family", "qwen25vl")
    run = runs("qwen25vl-vl-aligned-tight-keep0.1", "--family", "qwen25vl",
               "--draft", "qwen25vl_vl_aligned", "--k", "4", "--num-gpu-blocks", "6",
               "--max-num-batched-tokens", "16", *_pruning(0.1))
    assert_same_tokens(base, run)
    (w,) = run["workers"]
    print(f"preemptions {run['metrics']['vllm:num_preemptions']}, {w}")
    assert run["metrics"]["vllm:num_preemptions"] > 0
    assert w["drafter_pruned_visual_tokens"] > w["drafter_visual_tokens_in"] > 0
    assert w["drafter_pruned_items_unscored"] > 0  # a video prefilled before its question
    assert w["captured_key_bytes"] == 0  # pruning keeps the target's keys only during prefill


def test_pruned_drafts_under_tensor_parallel_2(runs):
    """Each rank scores with its own heads; the all-reduced scores give every rank one choice."""
    base = runs("qwen25vl-base-fp32", "--family", "qwen25vl", "--dtype", "float32")
    tp2 = runs("qwen25vl-vl-aligned-tp2-keep0.25", "--family", "qwen25vl", "--dtype", "float32",
               "--draft", "qwen25vl_vl_aligned", "--k", "4", "--tp", "2", *_pruning(0.25))
    assert_same_tokens(base, tp2)
    ranks = {w["tp_rank"]: w for w in tp2["workers"]}
    assert sorted(ranks) == [0, 1]
    for key in ("drafter_visual_tokens_in", "drafter_pruned_visual_tokens",
                "drafter_proposed_tokens"):
        assert ranks[0][key] == ranks[1][key] and ranks[0][key] > 0, key
    assert ranks[0]["draft_tokens"] == ranks[1]["draft_tokens"]
