"""A text-only draft of an M-RoPE target inside vllm.LLM: it drafts from the sequence a plain
forward of it computes.

vLLM hands a text-only draft the target's temporal M-RoPE row as its positions and, before
LVSpec's drafter fixed it, also computed the draft's KV slots from that row. After a video the
row trails the sequence index (a video's tokens share temporal positions), so the slots of the
prompt's later tokens landed on earlier ones and the draft attended to overwritten and stale
KV. With k = 1 every verified draft is the draft's greedy next token after the output so far,
so the benchmark world's text-only draft (trained on those temporal positions), run by Hugging
Face over prompt + output, predicts exactly how many drafts vLLM proposes and accepts.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.engine

CHECKPOINTS = Path(__file__).resolve().parents[1] / "lvspec_vllm" / "world" / "checkpoints"


def _predicted(prompt_ids: list[int], prompt_positions: torch.Tensor, outputs: list[int],
               draft) -> tuple[int, int, float]:
    """(drafted, accepted, smallest top-2 logit margin) of k = 1 greedy drafting."""
    ids = torch.tensor([prompt_ids + outputs])
    after = prompt_positions[-1] + 1 + torch.arange(len(outputs))  # text: one past each
    positions = torch.cat([prompt_positions, after])[None]
    with torch.no_grad():
        top = draft(input_ids=ids, position_ids=positions).logits[0].topk(2, dim=-1)
    drafted = accepted = 0
    margin = float("inf")
    i = 1  # tokens emitted; the first came from the prefill
    while i < len(outputs):
        row = len(prompt_ids) + i - 1
        margin = min(margin, float(top.values[row, 0] - top.values[row, 1]))
        drafted += 1
        if int(top.indices[row, 0]) == outputs[i]:
            accepted, i = accepted + 1, i + 2  # and the target's bonus token
        else:
            i += 1
    return drafted, accepted, margin


def test_text_only_draft_after_a_video_drafts_what_its_plain_forward_predicts(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lvspec_vllm.world import data

    out = tmp_path / "run.json"
    subprocess.run([sys.executable, "-m", "lvspec_vllm.bench.world_run",
                    "--target", str(CHECKPOINTS / "target"),
                    "--draft", str(CHECKPOINTS / "text_draft"), "--mode", "strict", "--k", "1",
                    "--n", "6", "--max-tokens", "32", "--out", str(out)],
                   check=True, timeout=600)
    run = json.loads(out.read_text())
    tok = AutoTokenizer.from_pretrained(CHECKPOINTS / "target")
    prompt = data.text_only(tok, [data.chat_prompt("Describe this video.")])
    prompt_ids = prompt["input_ids"][0].tolist()
    draft = AutoModelForCausalLM.from_pretrained(CHECKPOINTS / "text_draft",
                                                 dtype=torch.float32).eval()
    drafted = accepted = 0
    margin = float("inf")
    for vllm_prompt, outputs in zip(run["prompt_token_ids"], run["token_ids"]):
        assert vllm_prompt == prompt_ids  # the same expanded prompt on both sides
        d, a, m = _predicted(prompt_ids, prompt["position_ids"][0], outputs, draft)
        drafted, accepted, margin = drafted + d, accepted + a, min(margin, m)
    got = run["metrics"]
    print(f"text-only draft after a video: vLLM accepted "
          f"{got['vllm:spec_decode_num_accepted_tokens']} of "
          f"{got['vllm:spec_decode_num_draft_tokens']}; its plain forward predicts {accepted} of "
          f"{drafted}; smallest top-2 margin {margin:.2e}")
    assert margin > 1e-4  # no near-tie for the engine's float32 kernels to flip
    assert 0 < accepted < drafted
    assert got["vllm:spec_decode_num_draft_tokens"] == drafted
    assert got["vllm:spec_decode_num_accepted_tokens"] == accepted
