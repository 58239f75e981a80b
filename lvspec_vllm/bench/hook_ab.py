"""What ``auto_k`` costs inside one engine: its controller on, on without explorations, and off.

    python -m lvspec_vllm.bench.hook_ab --target DIR --draft DIR [--max-num-seqs 1]
        [--turns 8] [--requests 16] [--max-tokens 32] [--one-by-one] [--out FILE]

Between two servers of the same mode, or two engine processes, throughput on a 2-core CPU
differs by 10-30 % (``lvspec-bench serve``, ``step_phases``): a few per cent between modes
needs dozens of rounds there. Here one ``vllm.LLM`` (``auto_k`` with cold requests, the model
in the engine core's process) runs blocks of ``--requests`` greedy requests, and between blocks
the scheduler's hook is switched between three arms (``hook_switch.py``: ``auto``, ``no-explore``
and ``k0``), in an order that rotates from turn to turn.

With ``--one-by-one`` each request is submitted once the one before has finished, so that the
engine goes idle between requests as under a single client of a server, and the arms take
turns request by request (a turn's block per arm is the sum over its requests): the machine's
speed drifts over seconds on a 2-core CPU, and blocks of seconds each took that drift apart.

The engine is warmed up first (four passes over the videos: calibration and the first fits).
Printed: each block's output tokens/s, and per arm the geometric mean over turns of its
block's tokens/s over the ``k0`` block of the same turn, with a 95 % interval (Student's t),
the controller's own share of the wall time, Python's garbage collections in the arm's blocks
(share of the wall time, count per generation) and the steps per k in them.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time

from lvspec_vllm.bench.hook_switch import ARMS, switch


class _GCClock:
    """Python's garbage collections (``gc.callbacks``): count and seconds per generation."""

    def __init__(self):
        self.count, self.seconds, self._started = [0, 0, 0], [0.0, 0.0, 0.0], 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            g = info["generation"]
            self.count[g] += 1
            self.seconds[g] += time.perf_counter() - self._started

    def read(self) -> tuple[list[int], list[float]]:
        return list(self.count), list(self.seconds)


def add_reading(total: dict, part: dict) -> None:
    """Sum one request's reading into a turn's: numbers, lists by position, dicts by key."""
    for key, value in part.items():
        if isinstance(value, dict):
            merged = total.setdefault(key, {})
            for k, n in value.items():
                merged[k] = merged.get(k, 0) + n
        elif isinstance(value, list):
            total[key] = [a + b for a, b in zip(total.get(key, [0] * len(value)), value)]
        else:
            total[key] = total.get(key, 0) + value


def run(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import lvspec_vllm

    lvspec_vllm.register()
    from vllm import LLM, SamplingParams

    from lvspec_vllm.world import data, scenes

    llm = LLM(model=args.target, dtype="float32", max_model_len=1024, seed=0,
              max_num_seqs=args.max_num_seqs, enforce_eager=True,
              limit_mm_per_prompt={"video": 1}, enable_prefix_caching=False,
              speculative_config={"method": "lvspec", "model": args.draft,
                                  "num_speculative_tokens": 4, "loose": True, "auto_k": True,
                                  "draft_cold_requests": True})
    prompt = data.chat_prompt("Describe this video.")
    videos = [{"prompt": prompt,
               "multi_modal_data": {"video": (scenes.render(s), scenes.video_metadata())}}
              for s in data.held_out(16)]
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(videos * 4, params, use_tqdm=False)  # calibration and the first fits
    scheduler = llm.llm_engine.engine_core.engine_core.scheduler
    controller = scheduler.__dict__["_lvspec_auto_k"]
    budget = controller.auto.explore_budget
    block = (videos * (args.requests // len(videos) + 1))[:args.requests]
    collections = _GCClock()

    def measure(arm: str, requests: list) -> dict:
        """Run ``requests`` under ``arm``: all at once, or (``--one-by-one``) each after the
        one before has finished, the engine idle in between as under a single client."""
        switch(scheduler, controller, arm, budget)
        own, steps = controller.own_seconds, dict(controller.steps_by_k)
        gc_count, gc_seconds = collections.read()
        t0 = time.perf_counter()
        if args.one_by_one:
            outs = [llm.generate([r], params, use_tqdm=False)[0] for r in requests]
        else:
            outs = llm.generate(requests, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        count, seconds = collections.read()
        return {"output_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
                "elapsed_s": elapsed, "controller_s": controller.own_seconds - own,
                "gc": [c - c0 for c, c0 in zip(count, gc_count)],
                "gc_s": sum(seconds) - sum(gc_seconds),
                "steps_by_k": {k: n - steps.get(k, 0) for k, n in controller.steps_by_k.items()
                               if n - steps.get(k, 0)}}

    blocks = []
    for turn in range(args.turns):
        if args.one_by_one:
            # The arms take turns request by request (the order rotating), so that a drift of
            # the machine's speed, which on a 2-core CPU lasts seconds, falls on all three.
            # A turn's block per arm is the sum over its requests.
            totals = {arm: {"turn": turn, "arm": arm} for arm in ARMS}
            for i, request in enumerate(block):
                j = (turn * len(block) + i) % 3
                for arm in ARMS[j:] + ARMS[:j]:
                    add_reading(totals[arm], measure(arm, [request]))
            done = [totals[arm] for arm in ARMS]
        else:
            order = ARMS[turn % 3:] + ARMS[:turn % 3]
            done = [{"turn": turn, "arm": arm, **measure(arm, block)} for arm in order]
        for b in done:
            blocks.append(b)
            print(f"[hook_ab] turn {turn} {b['arm']}: "
                  f"{b['output_tokens'] / b['elapsed_s']:.1f} tokens/s", flush=True)
    switch(scheduler, controller, "auto", budget)
    return {"max_num_seqs": args.max_num_seqs, "requests": args.requests,
            "one_by_one": args.one_by_one,
            "max_tokens": args.max_tokens, "blocks": blocks}


def summary(result: dict) -> str:
    from lvspec_vllm.bench.paired import ratio_interval

    by = {(b["turn"], b["arm"]): b for b in result["blocks"]}
    turns = sorted({b["turn"] for b in result["blocks"]})
    lines = [f"| arm, {result['max_num_seqs']} at a time | tokens/s over k0's, same turn "
             f"| controller's own share of the wall time | garbage collections: share of the "
             f"wall time, count by generation | steps by k |", "|---|---|---|---|---|"]
    for arm in ARMS:
        mine = [by[t, arm] for t in turns]
        ratios = [(b["output_tokens"] / b["elapsed_s"])
                  / (by[t, "k0"]["output_tokens"] / by[t, "k0"]["elapsed_s"])
                  for t, b in zip(turns, mine)]
        mean, lo, hi = ratio_interval(ratios)
        share = sum(b["controller_s"] for b in mine) / sum(b["elapsed_s"] for b in mine)
        collected = "n/a"  # (serve_ab's blocks do not count them)
        if "gc" in mine[0]:
            gc_share = sum(b["gc_s"] for b in mine) / sum(b["elapsed_s"] for b in mine)
            collected = f"{100 * gc_share:.2f} %, {[sum(b['gc'][g] for b in mine) for g in range(3)]}"
        ks: dict = {}
        for b in mine:
            for k, n in b["steps_by_k"].items():
                ks[k] = ks.get(k, 0) + n
        reading = f"{mean:.3f}x" if math.isnan(lo) else f"{mean:.3f}x [{lo:.3f}-{hi:.3f}]"
        lines.append(f"| {arm} | {reading} | {100 * share:.2f} % | {collected} "
                     f"| {dict(sorted(ks.items()))} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--max-num-seqs", type=int, default=1)
    ap.add_argument("--turns", type=int, default=8, help="each arm's blocks")
    ap.add_argument("--requests", type=int, default=16, help="requests per block")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--one-by-one", action="store_true",
                    help="submit each request once the one before has finished (the engine "
                         "idle in between, as under one client) instead of a block at once")
    ap.add_argument("--out", default=None, help="JSON with every block")
    args = ap.parse_args(argv)
    if args.turns < 1 or args.requests < 1:
        ap.error("--turns and --requests take a positive count")
    result = run(args)
    print(summary(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
