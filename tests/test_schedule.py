"""k follows the batch: vLLM's per-batch-size schedule drives the LVSpec drafter.

Requests arrive in waves (4, 1, 5, 2), so the running batch size goes up and down across the
schedule's threshold several times; every run is compared token for token with the target's own
greedy decoding under the same waves.
"""

import json

import pytest

from conftest import run_generate

pytestmark = pytest.mark.engine

WAVES = ("--waves", "4,1,5,2", "--max-tokens", "12")


def _lvspec(schedule):
    return ("--family", "qwen25vl", "--draft", "qwen25vl_aligned", "--k", "4",
            "--lvspec-options", json.dumps({"num_speculative_tokens_per_batch_size": schedule}))


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_models):
    return run_generate(tmp_path_factory.mktemp("sched"), "base", "--family", "qwen25vl", *WAVES)


def test_schedule_of_zero_never_drafts(base, tmp_path):
    run = run_generate(tmp_path, "k0", *_lvspec([[1, 64, 0]]), *WAVES)
    (w,) = run["workers"]
    assert run["outputs"] == base["outputs"]
    assert len(run["outputs"]) == 12
    assert run["metrics"]["vllm:spec_decode_num_draft_tokens"] == 0
    # The drafter was asked every step and never ran: no drafting, no KV-sync pass either.
    assert w["drafter_propose_calls"] == w["drafter_skipped_passes"] > 0
    assert w["drafter_drafting_passes"] == w["drafter_kv_sync_passes"] == 0
    assert w["verify_steps"] == w["draft_tokens"] == 0


def test_crossing_the_threshold_keeps_strict_outputs(base, tmp_path):
    # k = 4 up to 2 running requests, 0 from 3 on.
    run = run_generate(tmp_path, "cross", *_lvspec([[1, 2, 4], [3, 64, 0]]), *WAVES)
    (w,) = run["workers"]
    print(w)
    assert run["outputs"] == base["outputs"]
    # Both sides of the threshold were visited: drafting steps and k = 0 steps whose draft
    # forward only kept the draft's KV cache in step.
    assert w["drafter_drafting_passes"] > 0 and w["drafter_kv_sync_passes"] > 0
    assert w["drafter_skipped_passes"] == 0
    assert w["draft_tokens"] == run["metrics"]["vllm:spec_decode_num_draft_tokens"] > 0
    assert w["accepted_tokens"] == run["metrics"]["vllm:spec_decode_num_accepted_tokens"] > 0
    # Each drafting step proposes k = 4 per request.
    assert w["drafter_proposed_tokens"] % 4 == 0


def test_auto_k_calibrates_across_k_and_keeps_strict_outputs(base, tmp_path):
    run = run_generate(tmp_path, "auto", "--family", "qwen25vl", "--draft", "qwen25vl_aligned",
                       "--k", "4", "--lvspec-options", json.dumps({"auto_k": True}), *WAVES)
    assert run["outputs"] == base["outputs"]
    (core,) = [v for k, v in run.get("published", {}).items() if k.startswith("core-")]
    steps = {int(k.removeprefix("auto_k_steps_")): n for k, n in core.items()
             if k.startswith("auto_k_steps_")}
    print(steps)
    # Calibration visits k = 0, 1, 2 and 4, switching between steps without stalling.
    assert {0, 1, 2, 4} <= set(steps)
    (w,) = run["workers"]
    assert w["drafter_drafting_passes"] > 0 and w["drafter_kv_sync_passes"] > 0
    assert w["draft_tokens"] == run["metrics"]["vllm:spec_decode_num_draft_tokens"] > 0
