"""The demo: serve the tiny Qwen2.5-VL pair with LVSpec and answer a video request over HTTP.

    lvspec-demo [--preset tiny-demo] [--max-tokens 48]

Starts ``vllm serve`` on 127.0.0.1 with ``--speculative-config`` from the preset, sends one chat
request with a base64 mp4 through the ``openai`` client, prints the reply and the spec-decode
counters from /metrics, and stops the server. The tiny checkpoints have random weights, so the
reply is not a caption yet; what the demo shows is the request path end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny-demo")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    from openai import OpenAI

    from lvspec_vllm.config import load_preset
    from lvspec_vllm.testing.media import synthetic_frames, write_mp4
    from lvspec_vllm.testing.server import SERVED_NAME, video_message, vllm_server
    from lvspec_vllm.testing.tiny_models import ensure_tiny_models

    target = str(ensure_tiny_models() / "qwen25vl")
    spec = load_preset(args.preset)
    work = tempfile.mkdtemp(prefix="lvspec-demo-")
    mp4 = write_mp4(os.path.join(work, "clip.mp4"), synthetic_frames(seed=1))
    log = os.path.join(work, "vllm-serve.log")
    print(f"[demo] vllm serve {target}\n[demo]   --speculative-config '{json.dumps(spec)}'  (log: {log})")
    t0 = time.time()
    with vllm_server(target, spec, log_path=log) as server:
        print(f"[demo] server ready in {time.time() - t0:.0f}s at {server.base_url}")
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        t1 = time.time()
        reply = client.chat.completions.create(
            model=SERVED_NAME, messages=video_message(mp4, "Describe this video."),
            max_tokens=args.max_tokens, temperature=0.0)
        dt = time.time() - t1
        m = server.metrics()
    drafts = m.get("vllm:spec_decode_num_drafts_total", 0.0)
    accepted = m.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    print(f"[demo] reply ({reply.usage.completion_tokens} tokens in {dt:.2f}s): "
          f"{reply.choices[0].message.content!r}")
    print(f"[demo] spec decode: drafts={drafts:.0f} "
          f"draft_tokens={m.get('vllm:spec_decode_num_draft_tokens_total', 0.0):.0f} "
          f"accepted={accepted:.0f} mean_acceptance_length="
          f"{1 + accepted / drafts if drafts else float('nan'):.2f}")


if __name__ == "__main__":
    main()
