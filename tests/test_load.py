"""`vllm serve` with LVSpec under concurrent load: nothing lost, strict outputs unchanged.

40 requests at once through the `openai` client: videos (three different clips), images and text;
greedy and seeded sampling; streaming and not; four streams dropped by the client after a few
chunks. The same load runs against a server without speculation, and then against LVSpec servers
(strict verification, max 8 running sequences so the rest queue and batches change size all the
time): on one worker, on two tensor-parallel workers, with a KV cache so small that vLLM preempts,
with k switching between 4 and 0 as the batch changes (deferred draft passes caught up later), and
with requests admitted at k = 0 never running the draft. Every request that was not dropped
completes with its full length; every greedy output equals the no-speculation server's; the server
is healthy afterwards.
"""

import asyncio
import base64
import io
import json
import time
import urllib.request

import pytest

from lvspec_vllm.metrics import PUBLISH_INTERVAL_S
from lvspec_vllm.testing.media import synthetic_frames, synthetic_image, write_mp4
from lvspec_vllm.testing.server import SERVED_NAME, vllm_server

pytestmark = pytest.mark.engine

# The 17th token of a video request (a 48-token prompt) is sampled from position 63, the row that
# fills its second 32-token KV block: a draft pass deferred at k = 0 must catch up there
# (draft_catch_up), however the batches happen to drain.
MAX_TOKENS = 17


def _png_url(seed):
    buf = io.BytesIO()
    synthetic_image(seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _workload(tmp_path):
    videos = []
    for seed in (1, 2, 3):
        mp4 = write_mp4(str(tmp_path / f"clip{seed}.mp4"), synthetic_frames(seed))
        videos.append("data:video/mp4;base64," + base64.b64encode(open(mp4, "rb").read()).decode())
    images = [_png_url(s) for s in (1, 2)]
    requests = []
    for i in range(40):
        kind = ("video", "image", "text", "video", "text")[i % 5]
        if kind == "video":
            content = [{"type": "video_url", "video_url": {"url": videos[i % 3]}},
                       {"type": "text", "text": "Describe this video."}]
        elif kind == "image":
            content = [{"type": "image_url", "image_url": {"url": images[i % 2]}},
                       {"type": "text", "text": "What is in the picture?"}]
        else:
            content = f"Tell me about item {i}."
        requests.append({
            "id": i, "kind": kind, "messages": [{"role": "user", "content": content}],
            "sampled": i % 4 == 3, "stream": i % 3 == 1, "abort": i in (7, 16, 25, 34)})
    return requests


async def _one(client, r):
    kwargs = dict(model=SERVED_NAME, messages=r["messages"], max_tokens=MAX_TOKENS,
                  extra_body={"ignore_eos": True})
    if r["sampled"]:
        kwargs.update(temperature=0.8, seed=r["id"])
    else:
        kwargs.update(temperature=0.0)
    if r["abort"]:  # the client goes away mid-stream
        stream = await client.chat.completions.create(stream=True, **kwargs)
        n = 0
        async for _ in stream:
            n += 1
            if n == 3:
                break
        await stream.close()
        return None
    if r["stream"]:
        stream = await client.chat.completions.create(
            stream=True, stream_options={"include_usage": True}, **kwargs)
        text, tokens = [], None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                text.append(chunk.choices[0].delta.content)
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return "".join(text), tokens
    reply = await client.chat.completions.create(**kwargs)
    return reply.choices[0].message.content, reply.usage.completion_tokens


async def _load(base_url, requests):
    from openai import AsyncOpenAI

    # The client's default retries stay on: vLLM answers a multimodal-cache drift between its
    # API and engine processes with a retryable 500 and expects the client to resend.
    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=600)
    try:
        return await asyncio.wait_for(asyncio.gather(*(_one(client, r) for r in requests)), 600)
    finally:
        await client.close()


def _serve_and_load(model, spec, requests, log, extra=(), env=None):
    # float32: TP=2 then matches TP=1 exactly (in bf16 vLLM's TP=2 rounds differently)
    args = ["--max-num-seqs", "8", "--dtype", "float32", *extra]
    with vllm_server(model, spec, log_path=log, extra_args=args, env=env) as srv:
        results = asyncio.run(_load(srv.base_url, requests))
        healthy = urllib.request.urlopen(f"{srv.base_url}/health", timeout=5).status == 200
        time.sleep(2 * PUBLISH_INTERVAL_S)  # the workers' last counts reach /metrics
        metrics = srv.metrics()
    return results, healthy, metrics


@pytest.fixture(scope="module")
def workload(tmp_path_factory):
    return _workload(tmp_path_factory.mktemp("load"))


@pytest.fixture(scope="module")
def baseline(tiny_models, workload, tmp_path_factory):
    """The same load against a server without speculative decoding."""
    log = tmp_path_factory.mktemp("base") / "base.log"
    results, healthy, _ = _serve_and_load(str(tiny_models / "qwen25vl"), None, workload, log)
    assert healthy
    return results


_PREEMPT = ("--num-gpu-blocks-override", "6", "--block-size", "32", "--max-model-len", "160")
_TP2 = ("--tensor-parallel-size", "2")
_TP2_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
# k switches between 4 and 0 with the running batch: decoding requests defer their draft pass
# and catch up when the batch shrinks or a KV block fills (draft_catch_up). Preemption keeps the
# batch small, so there k = 0 starts at 3 running requests; otherwise at 5. Whether a batch
# shrinks below that while requests lag depends on timing (waves of 8 admitted together finish
# together); the 32-token block filled at the last token (MAX_TOKENS) does not.
def _crossing(k0_from):
    return {"num_speculative_tokens_per_batch_size": [[1, k0_from - 1, 4], [k0_from, 64, 0]]}
VARIANTS = {  # name: (draft, extra server flags, extra environment, extra speculative config)
    "tp1": ("qwen25vl_aligned", (), None, {}),
    # heads sharded over two workers
    "tp2": ("qwen25vl_aligned", _TP2, _TP2_ENV, {}),
    # 6 blocks of 32 tokens for 8 running requests: vLLM preempts and recomputes
    "preempt": ("qwen25vl_aligned", _PREEMPT, None, {}),
    # a draft that sees the video (its own encoder cache), under the same preemption
    "video-draft-preempt": ("qwen25vl_vl_aligned", _PREEMPT, None, {}),
    # k switching with the batch, deferred draft passes, preempted requests recomputed
    "catch-up-preempt": ("qwen25vl_vl_aligned", _PREEMPT, None, _crossing(3)),
    "catch-up-tp2": ("qwen25vl_vl_aligned", ("--block-size", "32", *_TP2), _TP2_ENV,
                     _crossing(5)),
    # requests admitted at k = 0 never run the draft; the three clips' cached prefixes are
    # shared between cold requests and the rest (prefix caching is on)
    "cold-tp2": ("qwen25vl_vl_aligned", ("--block-size", "32", *_TP2), _TP2_ENV,
                 {**_crossing(5), "draft_cold_requests": True}),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_concurrent_mixed_load_loses_nothing_and_keeps_strict_outputs(
        tiny_models, workload, baseline, tmp_path, variant):
    draft, extra, env, options = VARIANTS[variant]
    spec = {"method": "lvspec", "model": str(tiny_models / draft), "num_speculative_tokens": 4,
            **options}
    lv, healthy, m = _serve_and_load(str(tiny_models / "qwen25vl"), spec, workload,
                                     tmp_path / f"{variant}.log", extra, env)
    print(variant, json.dumps({k: v for k, v in m.items()
                               if k.startswith(("lvspec:", "vllm:spec_decode_num", "vllm:num_pre"))
                               and not k.endswith("_created")}))
    assert healthy
    for r, b, x in zip(workload, baseline, lv):
        if r["abort"]:
            assert b is None and x is None
            continue
        assert x[1] == MAX_TOKENS and b[1] == MAX_TOKENS, r
        assert x[0], r
        if not r["sampled"]:
            assert x[0] == b[0], f"request {r['id']} ({r['kind']}, stream={r['stream']})"
    if "cold" in variant:
        # whether an early, warm request still drafts depends on how fast the batch fills
        assert m["lvspec:draft_cold_requests_total"] > 0
    else:
        assert m["vllm:spec_decode_num_drafts_total"] > 0
        assert m["vllm:spec_decode_num_accepted_tokens_total"] > 0
    if "preempt" in variant:
        assert m["vllm:num_preemptions_total"] > 0
    if "catch-up" in variant:
        assert m["lvspec:draft_skipped_steps_total"] > 0
        assert m["lvspec:draft_caught_up_tokens_total"] > 0
