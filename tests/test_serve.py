"""`vllm serve` and `vllm bench` with "method": "lvspec", on 127.0.0.1 with the tiny models."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lvspec_vllm.testing.media import synthetic_frames, write_mp4
from lvspec_vllm.testing.server import SERVED_NAME, video_message, vllm_server

pytestmark = pytest.mark.engine


def test_serve_answers_a_video_chat_and_counts_spec_decode(tiny_models, tmp_path):
    from openai import OpenAI

    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 4}
    mp4 = write_mp4(str(tmp_path / "clip.mp4"), synthetic_frames(seed=4))
    with vllm_server(str(tiny_models / "qwen25vl"), spec, log_path=tmp_path / "serve.log") as srv:
        client = OpenAI(base_url=f"{srv.base_url}/v1", api_key="none")
        before = srv.metrics()
        reply = client.chat.completions.create(
            model=SERVED_NAME, messages=video_message(mp4, "Describe this video."),
            max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True})
        after_video = srv.metrics()
        text = client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "hello, what is the sky?"}],
            max_tokens=24, temperature=0.0, extra_body={"ignore_eos": True})
        after_text = srv.metrics()
        # LVSpec's own counters reach /metrics within a second of the step that made them
        deadline = time.time() + 10
        while time.time() < deadline:
            lv = srv.metrics()
            if lv.get("lvspec:draft_tokens_total") == after_text[
                    "vllm:spec_decode_num_draft_tokens_total"]:
                break
            time.sleep(0.5)
        log = srv.log()
    # the video reached the model: far more prompt tokens than the text alone
    assert reply.usage.completion_tokens == 24 and reply.choices[0].message.content
    assert reply.usage.prompt_tokens > text.usage.prompt_tokens + 10
    drafts = "vllm:spec_decode_num_drafts_total"
    accepted = "vllm:spec_decode_num_accepted_tokens_total"
    assert after_video[drafts] > before.get(drafts, 0.0)
    assert after_text[drafts] > after_video[drafts]
    assert after_text[accepted] > after_video[accepted]  # the aligned draft agrees on text
    assert "LVSpec rejection sampler installed" in log
    assert lv["lvspec:draft_tokens_total"] == after_text["vllm:spec_decode_num_draft_tokens_total"]
    assert lv["lvspec:accepted_tokens_total"] == after_text[accepted]  # strict: all "exact"
    assert lv["lvspec:verify_steps_total"] > 0
    assert lv["lvspec:draft_seconds_total"] > 0  # the draft's own clock reached /metrics


def test_serve_refuses_bad_lvspec_option_at_startup(tiny_models, tmp_path):
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 4, "relevance_threshold": 7}
    with pytest.raises(RuntimeError) as err:
        with vllm_server(str(tiny_models / "qwen25vl"), spec, log_path=tmp_path / "bad.log"):
            pass
    assert "'relevance_threshold'=7 is out of range; allowed: [0.0, 1.0]" in str(err.value)


def test_vllm_bench_throughput_with_lvspec(tiny_models, tmp_path):
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 4}
    out = tmp_path / "bench.json"
    vllm_bin = Path(sys.executable).with_name("vllm")
    proc = subprocess.run(
        [str(vllm_bin), "bench", "throughput", "--model", str(tiny_models / "qwen25vl"),
         "--dtype", "bfloat16", "--max-model-len", "2048", "--enforce-eager",
         "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "16",
         "--num-prompts", "4", "--speculative-config", json.dumps(spec),
         "--output-json", str(out)],
        capture_output=True, text=True, timeout=600,
        env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4 and result["tokens_per_second"] > 0
    assert "LVSpec rejection sampler installed" in proc.stdout + proc.stderr
