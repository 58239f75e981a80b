"""vllm.LLM on CPU with the tiny models: LVSpec installed in every worker, strict mode lossless.

Each engine runs in its own process (lvspec_vllm.testing.generate). The batch mixes text, image
and video requests; outputs are compared token for token with the target's own greedy decoding.
"""

import json

import pytest

from conftest import assert_same_tokens

pytestmark = pytest.mark.engine

FAMILIES = {"qwen25vl": "qwen25vl_aligned", "llava_ov": "llava_ov_aligned"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_strict_lvspec_equals_target_greedy(runs, family):
    base = runs(f"{family}-base", "--family", family)
    lv = runs(f"{family}-lvspec", "--family", family, "--draft", FAMILIES[family], "--k", "4")
    assert_same_tokens(base, lv)
    assert all(len(o) == 40 for o in lv["outputs"])
    # The LVSpec classes did the work, and their counts agree with vLLM's own metrics.
    (worker,) = lv["workers"]
    assert worker["drafter"] == "LVSpecDrafter"
    assert worker["rejection_sampler"] == "LVSpecRejectionSampler"
    assert worker["verify_steps"] > 0
    assert worker["draft_tokens"] == lv["metrics"]["vllm:spec_decode_num_draft_tokens"] > 0
    assert worker["accepted_tokens"] == lv["metrics"]["vllm:spec_decode_num_accepted_tokens"]
    # The aligned draft agrees with the target on the text requests: the accept path ran.
    assert worker["accepted_tokens"] > 0
    # strict: every accepted token is an exact match
    assert worker["exact"] == worker["accepted_tokens"]
    assert worker["plausible"] == worker["semantic"] == worker["shifted"] == 0
    print(f"{family}: {worker}")


TEXT_REQUESTS = (0, 4)  # indices of the text-only prompts in generate.mixed_requests
LOOSE = {"loose": True, "anchor_identification": False, "plausibility_ratio": 0.05,
         "plausibility_top_k": 50}


def test_loose_without_identification_accepts_fillers_and_counts_them(runs):
    base = runs("qwen25vl-base", "--family", "qwen25vl")
    strict = runs("qwen25vl-lvspec", "--family", "qwen25vl", "--draft", "qwen25vl_aligned",
                  "--k", "4")
    loose = runs("qwen25vl-loose", "--family", "qwen25vl", "--draft", "qwen25vl_aligned",
                 "--k", "4", "--lvspec-options", json.dumps(LOOSE))
    (w,) = loose["workers"]
    n_loose = w["plausible"] + w["semantic"] + w["shifted"]
    print(f"loose: {w}")
    assert n_loose > 0
    # the verifier's account agrees with vLLM's accepted count
    assert w["exact"] + n_loose == w["accepted_tokens"] \
        == loose["metrics"]["vllm:spec_decode_num_accepted_tokens"]
    # text-only requests have no visual evidence: verified strictly by default
    for i in TEXT_REQUESTS:
        assert loose["outputs"][i] == base["outputs"][i]
    assert all(len(o) == 40 for o in loose["outputs"])
    # longer accepted drafts: fewer verify steps for the same tokens
    assert w["verify_steps"] < strict["workers"][0]["verify_steps"]


def test_strict_lvspec_with_an_unrelated_draft_is_still_exact(runs):
    """A random draft is rejected almost always: the reject/recover path alone."""
    base = runs("qwen25vl-base", "--family", "qwen25vl")
    lv = runs("qwen25vl-random-draft", "--family", "qwen25vl", "--draft", "qwen2_draft",
              "--k", "3")
    assert_same_tokens(base, lv)


def test_tensor_parallel_2(runs):
    """TP=2 (mp executor): LVSpec active on both ranks, identical decisions, same tokens as TP=1.

    float32: in bfloat16, vLLM's TP=2 already differs from TP=1 without any speculation (the
    all-reduce of partial sums rounds differently), which would hide what this test checks.
    """
    base_tp1 = runs("qwen25vl-base-fp32", "--family", "qwen25vl", "--dtype", "float32")
    tp2 = runs("qwen25vl-lvspec-tp2-fp32", "--family", "qwen25vl", "--dtype", "float32",
               "--draft", "qwen25vl_aligned", "--k", "4", "--tp", "2")
    assert_same_tokens(base_tp1, tp2)
    assert sorted(w["tp_rank"] for w in tp2["workers"]) == [0, 1]
    for w in tp2["workers"]:
        assert w["drafter"] == "LVSpecDrafter"
        assert w["rejection_sampler"] == "LVSpecRejectionSampler"
        assert w["verify_steps"] > 0
    # every rank verified the same drafts and accepted the same tokens
    assert len({(w["draft_tokens"], w["accepted_tokens"]) for w in tp2["workers"]}) == 1
    assert tp2["workers"][0]["accepted_tokens"] > 0


def test_tensor_parallel_2_loose_decisions_are_identical_on_every_rank(runs):
    """Every rank runs the verifier on all-gathered logits and feeds its own result to its
    drafter and KV cache: the decisions must be bit-identical, with every rule on (visual
    masses all-reduced over the sharded heads, embedding rows gathered over the sharded vocab).
    float32, as in the strict TP test."""
    options = json.dumps({**LOOSE, "anchor_identification": True, "relevance_threshold": 0.3})
    common = ("--family", "qwen25vl", "--dtype", "float32", "--draft", "qwen25vl_aligned",
              "--k", "4", "--no-prefix-caching", "--lvspec-options", options)
    tp1 = runs("qwen25vl-loose-fp32", *common)
    tp2 = runs("qwen25vl-loose-tp2-fp32", *common, "--tp", "2")
    assert_same_tokens(tp1, tp2)
    rank0, rank1 = sorted(tp2["workers"], key=lambda w: w["tp_rank"])
    own = {"tp_rank", "drafter_draft_us", "draft_seconds"}  # the rank; its draft's own time
    decisions = {k: v for k, v in rank0.items() if k not in own}
    assert decisions == {k: v for k, v in rank1.items() if k not in own}
    assert rank0["rejected_anchor"] > 0 and rank0["plausible"] + rank0["shifted"] > 0
    # each rank holds its own share of the KV heads' captured keys; every decision is the same
    sharded = own | {"captured_key_bytes"}
    tp1_decisions = {k: v for k, v in tp1["workers"][0].items() if k not in sharded}
    assert {k: v for k, v in decisions.items() if k not in sharded} == tp1_decisions


def test_loose_with_visual_anchors_runs_and_rejects_anchors(runs):
    """Identification on: the target's attention on the video marks anchors, which stay strict."""
    options = json.dumps({**LOOSE, "anchor_identification": True, "relevance_threshold": 0.3})
    lv = runs("qwen25vl-anchors", "--family", "qwen25vl", "--draft", "qwen25vl_aligned",
              "--k", "4", "--no-prefix-caching", "--lvspec-options", options)
    base = runs("qwen25vl-base", "--family", "qwen25vl")
    (w,) = lv["workers"]
    assert w["rejected_anchor"] > 0 and w["plausible"] + w["semantic"] + w["shifted"] > 0
    assert w["exact"] + w["plausible"] + w["semantic"] + w["shifted"] == w["accepted_tokens"]
    for i in TEXT_REQUESTS:
        assert lv["outputs"][i] == base["outputs"][i]


def test_strict_lvspec_survives_preemption_with_video(runs):
    """A KV cache of 7 x 32 slots cannot hold the six requests: vLLM preempts and recomputes,
    and the strict output is still the target's greedy output."""
    base = runs("qwen25vl-base", "--family", "qwen25vl")
    tight = runs("qwen25vl-lvspec-preempt", "--family", "qwen25vl", "--draft",
                 "qwen25vl_aligned", "--k", "4", "--num-gpu-blocks", "7")
    assert tight["metrics"]["vllm:num_preemptions"] > 0
    assert_same_tokens(base, tight)
