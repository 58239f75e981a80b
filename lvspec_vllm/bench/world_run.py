"""One benchmark mode in one process: a vllm.LLM over the world's held-out videos.

``lvspec-bench`` starts this once per mode so every engine starts clean and its memory goes
with it. Writes JSON: outputs, the timed run's wall time and token count, vLLM's spec-decode
counters and the LVSpec workers' counts (differences over the timed run only).
"""

from __future__ import annotations

import argparse
import json
import os
import time

# mode -> LVSpec options (None: no speculation)
MODES = {
    "none": None,
    "strict": {},
    "lvspec": {"loose": True},
    "no-id": {"loose": True, "anchor_identification": False},
    "no-shift": {"loose": True, "shift": False},
    "no-semantic": {"loose": True, "semantic": False},
}
WARMUP_REQUESTS = 2


def anchor_token_ids(tokenizer) -> list[int]:
    """Token ids that spell an anchor word on their own (with or without a leading space)."""
    from lvspec_vllm.world import language

    ids = set()
    for word in language.ANCHOR_KINDS:
        for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
            pieces = tokenizer.encode(variant, add_special_tokens=False)
            if len(pieces) == 1:
                ids.add(pieces[0])
    return sorted(ids)


def lengthen(video, frames: int, upscale: int):
    """A longer, larger clip for cost measurements: the frames looped to ``frames`` and each
    pixel repeated ``upscale`` times per side. The scene is the same; its token count grows with
    the frames, and with upscale^2 only where the processor does not cap the frame size (the
    world pair's caps frames at 56x56). The trained pair never saw such clips."""
    import numpy as np

    idx = np.arange(frames) % video.shape[0]
    return video[idx].repeat(upscale, axis=1).repeat(upscale, axis=2)


def long_metadata(frames: int) -> dict:
    from lvspec_vllm.world import scenes

    return {**scenes.video_metadata(), "total_num_frames": frames,
            "duration": frames / scenes.FPS, "frames_indices": list(range(frames))}


def _metric_values(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            if hasattr(m, "value"):
                out[m.name] = m.value
            elif hasattr(m, "values"):  # per-position acceptance
                out[m.name] = list(m.values)
    return out


def _diff(after, before):
    if isinstance(after, list):
        return [a - b for a, b in zip(after, before or [0] * len(after))]
    if isinstance(after, (int, float)) and not isinstance(after, bool):
        return after - (before or 0)
    return after


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--mode", choices=sorted(MODES), required=True)
    ap.add_argument("--lvspec-options", default="{}", help="JSON, applied to every LVSpec mode")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--n", type=int, default=32, help="held-out videos")
    ap.add_argument("--skip", type=int, default=0,
                    help="start after this many held-out videos (a tuning slice apart from the "
                         "reported one)")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--frames", type=int, default=None,
                    help="loop each clip to this many frames (draft cost on long videos)")
    ap.add_argument("--upscale", type=int, default=1, help="and enlarge each frame this much")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # worker_report by value
    from transformers import AutoTokenizer

    from lvspec_vllm.sampler import ANCHOR_LABELS_ENV
    from lvspec_vllm.world import data, scenes

    tok = AutoTokenizer.from_pretrained(args.target)
    labels = args.out + ".labels.json"
    with open(labels, "w") as f:
        json.dump(anchor_token_ids(tok), f)
    os.environ[ANCHOR_LABELS_ENV] = labels

    from vllm import LLM, SamplingParams

    frames = args.frames or scenes.FRAMES
    # an upper bound for sizing: the processor may shrink enlarged frames (the world pair's
    # caps each at 56x56); the run reports the count it measured in the prompts
    most_tokens = data.video_tokens() * frames // scenes.FRAMES * args.upscale ** 2
    max_len = max(1024, most_tokens + 256)
    kwargs = dict(model=args.target, dtype=args.dtype, max_model_len=max_len, seed=0,
                  max_num_batched_tokens=max(2048, max_len),
                  max_num_seqs=args.max_num_seqs, enforce_eager=True, disable_log_stats=False,
                  limit_mm_per_prompt={"video": 1}, enable_prefix_caching=False)
    options = MODES[args.mode]
    if options is not None:
        # The mode's keys win: an ablation switches off one part of the user's LVSpec options.
        kwargs["speculative_config"] = {"method": "lvspec", "model": args.draft,
                                        "num_speculative_tokens": args.k,
                                        **json.loads(args.lvspec_options), **options}
        if args.mode == "strict":
            kwargs["speculative_config"]["loose"] = False
    llm = LLM(**kwargs)
    held = data.held_out(args.skip + args.n)[args.skip:]
    prompt = data.chat_prompt("Describe this video.")
    if frames == scenes.FRAMES and args.upscale == 1:
        videos = [(scenes.render(s), scenes.video_metadata()) for s in held]
    else:
        videos = [(lengthen(scenes.render(s), frames, args.upscale), long_metadata(frames))
                  for s in held]
    requests = [{"prompt": prompt, "multi_modal_data": {"video": v}} for v in videos]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    llm.generate(requests[:WARMUP_REQUESTS], params, use_tqdm=False)

    from lvspec_vllm.sampler import worker_report

    spec = options is not None
    m0 = _metric_values(llm)
    w0 = llm.collective_rpc(worker_report)[0] if spec else {}
    t0 = time.perf_counter()
    outs = llm.generate(requests, params, use_tqdm=True)
    elapsed = time.perf_counter() - t0
    m1 = _metric_values(llm)
    w1 = llm.collective_rpc(worker_report)[0] if spec else {}
    video_id = tok.convert_tokens_to_ids("<|video_pad|>")
    video_tokens = sum(o.prompt_token_ids.count(video_id) for o in outs) / len(outs)
    result = {
        "mode": args.mode, "k": args.k if spec else 0, "n": args.n,
        "skip": args.skip,
        "video_tokens": video_tokens,
        "speculative_config": kwargs.get("speculative_config"),
        "texts": [o.outputs[0].text for o in outs],
        "token_ids": [list(o.outputs[0].token_ids) for o in outs],
        "prompt_token_ids": [list(o.prompt_token_ids) for o in outs],
        "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
        "elapsed_s": elapsed,
        "metrics": {k: _diff(v, m0.get(k)) for k, v in m1.items()},
        "worker": {k: _diff(v, w0.get(k)) for k, v in w1.items()},
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
