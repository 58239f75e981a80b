"""The demo: serve the trained benchmark pair with LVSpec and caption a video over HTTP.

    lvspec-demo [--scene N] [--preset world-demo] [--max-tokens 48]

Starts ``vllm serve`` on 127.0.0.1 with the world target (a small Qwen2.5-VL trained on the
project's synthetic videos, ``lvspec_vllm/world/checkpoints``) and ``--speculative-config`` from
the preset (its video-aware draft by default), renders a held-out video with known content, sends
it as an mp4 through the ``openai`` client, and prints the caption beside the ground truth, then
the spec-decode counters from /metrics. ``--preset tiny-demo`` serves the random-weight tiny pair
instead (the request path only: its reply is not a caption).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

QUESTION = "Describe this video."


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="world-demo")
    ap.add_argument("--scene", type=int, default=0, help="which held-out video (0, 1, ...)")
    ap.add_argument("--max-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    from openai import OpenAI

    from lvspec_vllm.config import load_preset
    from lvspec_vllm.testing.media import write_mp4
    from lvspec_vllm.testing.server import SERVED_NAME, video_message, vllm_server
    from lvspec_vllm.world import checkpoints_dir, data, language, scenes

    spec = load_preset(args.preset)
    world = spec["model"].startswith(str(checkpoints_dir()))
    if world:
        target = str(checkpoints_dir() / "target")
        scene = data.held_out(args.scene + 1)[args.scene]
        frames, fps, extra = scenes.render(scene), scenes.FPS, ["--dtype", "float32"]
    else:
        from lvspec_vllm.testing.media import synthetic_frames
        from lvspec_vllm.testing.tiny_models import ensure_tiny_models

        target = str(ensure_tiny_models() / "qwen25vl")
        scene, frames, fps, extra = None, synthetic_frames(seed=1), 2.0, []
    work = tempfile.mkdtemp(prefix="lvspec-demo-")
    mp4 = write_mp4(os.path.join(work, "clip.mp4"), frames, fps=fps)
    log = os.path.join(work, "vllm-serve.log")
    print(f"[demo] vllm serve {target}\n[demo]   --speculative-config '{json.dumps(spec)}'  "
          f"(log: {log})")
    t0 = time.time()
    with vllm_server(target, spec, log_path=log, extra_args=extra) as server:
        print(f"[demo] server ready in {time.time() - t0:.0f}s at {server.base_url}")
        client = OpenAI(base_url=f"{server.base_url}/v1", api_key="none")
        t1 = time.time()
        reply = client.chat.completions.create(
            model=SERVED_NAME, messages=video_message(mp4, QUESTION),
            max_tokens=args.max_tokens, temperature=0.0)
        dt = time.time() - t1
        m = server.metrics()
    text = reply.choices[0].message.content
    print(f"[demo] {QUESTION!r} -> ({reply.usage.completion_tokens} tokens in {dt:.2f}s)\n"
          f"[demo]   {text}")
    if scene is not None:
        truth = language.truth(scene)
        scored = language.score(truth, language.parse_caption(text))
        right, total = (sum(x[i] for x in scored.values()) for i in (0, 1))
        print(f"[demo] ground truth: {json.dumps(truth)}\n"
              f"[demo] facts stated correctly: {right} of {total}")
    drafts = m.get("vllm:spec_decode_num_drafts_total", 0.0)
    accepted = m.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    print(f"[demo] spec decode: drafts={drafts:.0f} "
          f"draft_tokens={m.get('vllm:spec_decode_num_draft_tokens_total', 0.0):.0f} "
          f"accepted={accepted:.0f} mean_acceptance_length="
          f"{1 + accepted / drafts if drafts else float('nan'):.2f}")


if __name__ == "__main__":
    main()
