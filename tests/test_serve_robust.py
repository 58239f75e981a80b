"""`vllm serve` with loose LVSpec (anchor identification on): bad requests get vLLM's usual error
responses while good ones carry on, and over a few hundred requests the plugin's per-request
state returns to empty and memory stays flat."""

import asyncio
import base64
import json
import os
import time
import urllib.request

import pytest

from lvspec_vllm.testing.media import synthetic_frames, write_mp4
from lvspec_vllm.testing.server import SERVED_NAME, vllm_server

pytestmark = pytest.mark.engine


def _video_url(tmp_path, seed):
    mp4 = write_mp4(str(tmp_path / f"v{seed}.mp4"), synthetic_frames(seed))
    return "data:video/mp4;base64," + base64.b64encode(open(mp4, "rb").read()).decode()


def _video(url, text="Describe this video."):
    return [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                         {"type": "text", "text": text}]}]


def _rss_mb(pid) -> float:
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robust")
    spec = {"method": "lvspec", "model": str(tiny_models / "qwen25vl_aligned"),
            "num_speculative_tokens": 4, "loose": True}
    with vllm_server(str(tiny_models / "qwen25vl"), spec, log_path=tmp / "serve.log",
                     extra_args=["--no-enable-prefix-caching", "--max-num-seqs", "16"]) as srv:
        srv.tmp = tmp
        yield srv


async def _chat(client, messages, **kw):
    reply = await client.chat.completions.create(
        model=SERVED_NAME, messages=messages, **{"max_tokens": 12, "temperature": 0.0, **kw})
    return reply.usage.completion_tokens


def test_bad_requests_get_errors_and_others_carry_on(server):
    import openai
    from openai import AsyncOpenAI

    tmp = server.tmp
    good_video = _video_url(tmp, 1)
    corrupt = "data:video/mp4;base64," + base64.b64encode(os.urandom(3000)).decode()
    two_videos = [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": good_video}},
        {"type": "video_url", "video_url": {"url": good_video}},
        {"type": "text", "text": "Compare."}]}]
    bad = {
        "corrupt video": dict(messages=_video(corrupt)),
        "empty video": dict(messages=_video("data:video/mp4;base64,")),
        "too many videos": dict(messages=two_videos),
        "over the context length": dict(messages=[{"role": "user",
                                                   "content": "hello " * 3000}]),
        "negative temperature": dict(messages=_video(good_video), temperature=-1.0),
        "top_p above 1": dict(messages=_video(good_video), top_p=2.0),
        "max_tokens over the context": dict(messages=_video(good_video), max_tokens=100000),
    }

    async def run():
        # Good requests keep the client's default retries: the engine can answer one with
        # vLLM's retryable 500 (multimodal cache drift, docs/troubleshooting.md; likely set
        # off by the refused requests that carry the same video), which clients are expected
        # to resend. The bad requests' errors are read without retries.
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        once = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none", max_retries=0)
        good = [_chat(client, _video(good_video), max_tokens=24, extra_body={"ignore_eos": True})
                for _ in range(8)]

        async def expect_error(name, kw):
            try:
                await _chat(once, **kw)
            except openai.APIStatusError as e:
                return name, e.status_code, str(e)[:200]
            return name, 200, "accepted"

        try:
            return await asyncio.gather(asyncio.gather(*good),
                                        *(expect_error(n, kw) for n, kw in bad.items()))
        finally:
            await client.close()
            await once.close()

    good, *errors = asyncio.run(run())
    for name, status, message in errors:
        print(f"{name}: {status} {message}")
        assert 400 <= status < 500, (name, status, message)
    assert good == [24] * 8
    assert urllib.request.urlopen(f"{server.base_url}/health", timeout=5).status == 200


def test_steady_state_over_hundreds_of_requests(server):
    from openai import AsyncOpenAI

    urls = [_video_url(server.tmp, s) for s in (2, 3, 4)]
    mix = [_video(urls[i % 3]) if i % 2 else
           [{"role": "user", "content": f"Say something about {i}."}] for i in range(240)]

    async def run(batch):
        client = AsyncOpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        sem = asyncio.Semaphore(16)

        async def one(m):
            async with sem:
                return await _chat(client, m, extra_body={"ignore_eos": True})
        try:
            return await asyncio.gather(*(one(m) for m in batch))
        finally:
            await client.close()

    assert asyncio.run(run(mix[:40])) == [12] * 40  # warm-up: allocator and caches settle
    rss_warm = _rss_mb(server.process.pid)
    assert asyncio.run(run(mix)) == [12] * 240
    rss_after = _rss_mb(server.process.pid)
    # One text-only request after the load: the plugin drops state of requests that left.
    assert asyncio.run(run([mix[0]])) == [12]
    # The worker mirrors its gauges to the API process every 0.5 s: give the last step time to land.
    deadline = time.monotonic() + 10
    while True:
        m = server.metrics()
        settled = m["lvspec:live_request_states"] <= 1 and m["lvspec:captured_key_bytes"] == 0
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    print(json.dumps({"rss_mb_after_warmup": round(rss_warm), "rss_mb_after_240": round(rss_after),
                      "live_request_states": m["lvspec:live_request_states"],
                      "captured_key_bytes": m["lvspec:captured_key_bytes"]}))
    assert m["lvspec:live_request_states"] <= 1
    assert m["lvspec:captured_key_bytes"] == 0
    # Bound measured on the CPU build (docs/development.md): the whole server (API, engine,
    # worker) grows by tens of MB at most once warm.
    assert rss_after - rss_warm < 256, (rss_warm, rss_after)
