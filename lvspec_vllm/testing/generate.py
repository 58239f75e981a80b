"""Greedy generation over a fixed mixed batch (text, image and video prompts) with ``vllm.LLM``.

The engine tests run this as a subprocess, once per engine: a vLLM engine per process keeps
memory bounded and leaves nothing behind between runs. It writes one JSON document::

    {"outputs": [[token ids], ...], "prompts": [...], "workers": [worker_report, ...],
     "metrics": {"vllm:spec_decode_num_drafts": n, ...}}

    python -m lvspec_vllm.testing.generate --family qwen25vl --out result.json \
        [--draft DIR --k 4 --lvspec-options '{}'] [--tp 2] [--only video]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

FAMILIES = {
    # family: (target dir, aligned draft dir, video prompt, image prompt)
    "qwen25vl": ("qwen25vl", "qwen25vl_aligned"),
    "llava_ov": ("llava_ov", "llava_ov_aligned"),
}


def mixed_requests(family: str) -> list[dict]:
    from lvspec_vllm.testing import tiny_models as tm
    from lvspec_vllm.testing.media import synthetic_image, synthetic_video

    video_prompt = tm.QWEN_VIDEO_PROMPT if family == "qwen25vl" else tm.LLAVA_VIDEO_PROMPT
    image_prompt = tm.QWEN_IMAGE_PROMPT if family == "qwen25vl" else tm.LLAVA_IMAGE_PROMPT
    text = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
    return [
        {"prompt": text.format("Describe a red car moving left.")},
        {"prompt": video_prompt, "multi_modal_data": {"video": synthetic_video(1)}},
        {"prompt": image_prompt, "multi_modal_data": {"image": synthetic_image(2)}},
        # vLLM 0.32's LLaVA-OneVision returns 3-D embeddings when one batch holds videos of
        # different lengths (its list path keeps a batch dim), so only Qwen gets a short video.
        {"prompt": video_prompt,
         "multi_modal_data": {"video": synthetic_video(3, frames=4 if family == "qwen25vl" else 8)}},
        {"prompt": text.format("hello, what is the sky?")},
        {"prompt": video_prompt, "multi_modal_data": {"video": synthetic_video(5)}},
    ]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(FAMILIES), required=True)
    ap.add_argument("--models", default=None, help="tiny models directory (built if missing)")
    ap.add_argument("--draft", default=None, help="draft dir name or path; omit for no speculation")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--lvspec-options", default="{}", help="extra LVSpec keys as JSON")
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="small values split prompts over several steps (chunked prefill)")
    ap.add_argument("--num-gpu-blocks", type=int, default=None,
                    help="KV cache blocks; small values force preemption")
    ap.add_argument("--block-size", type=int, default=None,
                    help="KV cache block size (small values make blocks fill often)")
    ap.add_argument("--stagger", type=int, default=0,
                    help="request i generates max_tokens + stagger * (i %% 4) tokens, so a batch "
                         "shrinks one request at a time")
    ap.add_argument("--waves", default=None,
                    help="comma-separated request counts arriving in waves, each wave when the "
                         "previous one has finished: the batch size goes up and down")
    ap.add_argument("--only", choices=("text", "image", "video"), default=None,
                    help="keep only the requests of this modality")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    # worker_report travels to the workers by value through collective_rpc.
    os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
    if args.tp > 1:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(i) for i in range(args.tp)))

    from lvspec_vllm.testing.tiny_models import ensure_tiny_models

    models = ensure_tiny_models(args.models)
    target = models / FAMILIES[args.family][0]

    from vllm import LLM, SamplingParams

    kwargs = dict(model=str(target), dtype=args.dtype, max_model_len=2048, max_num_seqs=8,
                  limit_mm_per_prompt={"video": 1, "image": 1}, seed=0, enforce_eager=True,
                  tensor_parallel_size=args.tp, disable_log_stats=False,
                  enable_prefix_caching=not args.no_prefix_caching)
    if args.max_num_batched_tokens:
        kwargs.update(max_num_batched_tokens=args.max_num_batched_tokens,
                      enable_chunked_prefill=True)
    if args.block_size:
        kwargs["block_size"] = args.block_size
    if args.num_gpu_blocks:
        kwargs.update(num_gpu_blocks_override=args.num_gpu_blocks, block_size=32,
                      max_model_len=min(2048, 32 * args.num_gpu_blocks - 64))
    if args.draft:
        draft = args.draft if os.path.isabs(args.draft) else str(models / args.draft)
        kwargs["speculative_config"] = {"method": "lvspec", "model": draft,
                                        "num_speculative_tokens": args.k,
                                        **json.loads(args.lvspec_options)}
    llm = LLM(**kwargs)
    requests = mixed_requests(args.family)
    if args.only:
        requests = [r for r in requests
                    if args.only in r.get("multi_modal_data", {"text": None})]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    waves = [int(w) for w in args.waves.split(",")] if args.waves else [len(requests)]
    per_request = []
    for i in range(sum(waves)):
        p = params.clone()
        p.max_tokens = args.max_tokens + args.stagger * (i % 4)
        per_request.append(p)
    if args.waves:
        outs = _run_waves(llm, requests, per_request, waves)
    else:
        outs = llm.generate(requests, per_request, use_tqdm=False)
    result = {"outputs": [list(o.outputs[0].token_ids) for o in outs],
              "texts": [o.outputs[0].text for o in outs],
              "prompt_tokens": [len(o.prompt_token_ids) for o in outs],
              "workers": [], "metrics": {}}
    if args.draft:
        from lvspec_vllm.sampler import worker_report

        result["workers"] = llm.collective_rpc(worker_report)
    for m in llm.get_metrics():
        if (m.name.startswith("vllm:spec_decode") or m.name == "vllm:num_preemptions") \
                and hasattr(m, "value"):
            result["metrics"][m.name] = m.value
    # what LVSpec's processes published for /metrics (the engine core's auto_k counts among them)
    from lvspec_vllm.metrics import ENV as METRICS_ENV

    if os.environ.get(METRICS_ENV):
        import glob
        import time

        time.sleep(1.0)  # one publish interval
        for path in glob.glob(os.path.join(os.environ[METRICS_ENV], "*.json")):
            with open(path) as f:
                result.setdefault("published", {})[os.path.basename(path)] = json.load(f)
    with open(args.out, "w") as f:
        json.dump(result, f)
    print(json.dumps({k: result[k] for k in ("workers", "metrics")}), file=sys.stderr)


def _run_waves(llm, requests, params: list, waves: list[int]) -> list:
    """Feed the engine in waves, stepping it by hand; outputs in submission order."""
    engine = llm.llm_engine
    done, n = {}, 0
    for size in waves:
        for _ in range(size):
            engine.add_request(str(n), requests[n % len(requests)], params[n])
            n += 1
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    done[int(out.request_id)] = out
    return [done[i] for i in range(n)]


if __name__ == "__main__":
    main()
