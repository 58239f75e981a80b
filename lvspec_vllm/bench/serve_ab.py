"""What ``auto_k`` costs inside one server: ``hook_ab``'s arms, switched between requests.

    python -m lvspec_vllm.bench.serve_ab --target DIR --draft DIR [--concurrency 1]
        [--turns 8] [--requests 16] [--max-tokens 32] [--warmup-requests 8] --out DIR

``lvspec-bench serve`` compares modes that each run in a server of their own, and on a 2-core
CPU servers of one mode differ by 10-30 %. ``hook_ab`` removes that spread but has no server:
no API server, no HTTP, no media decoding between requests. Here one ``vllm serve``
(``auto_k`` with cold requests, the model in the engine core's process) answers chat
requests on 127.0.0.1 from the ``openai`` client, and before each unit of ``--concurrency``
concurrent requests the scheduler's hook is switched to an arm (``hook_switch.py``: ``auto``,
``no-explore``, ``k0``) through the server's ``/collective_rpc`` (``VLLM_SERVER_DEV_MODE=1``
and the worker extension ``HookSwitch``). The arms take turns unit by unit, the order
rotating; a turn's block per arm sums its units (``--requests`` requests each). The server
first answers ``--warmup-requests``, two at a time (calibration and the first fits).

Printed as ``hook_ab`` prints: per arm the geometric mean over turns of its tokens/s over the
``k0`` block of the same turn, with a 95 % interval, the controller's own share of the wall
time and the steps per k. Written: ``serve_ab.json`` and the server's log in ``--out``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.request
from pathlib import Path

from lvspec_vllm.bench.hook_switch import ARMS


def _arm(base_url: str, arm: str) -> dict:
    """Switch the server's hook to ``arm``; the controller's counters at the switch."""
    body = json.dumps({"method": "lvspec_hook_arm", "args": [arm]}).encode()
    request = urllib.request.Request(f"{base_url}/collective_rpc", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        (counters,) = json.loads(response.read())["results"]
    return counters


def _between(after: dict, before: dict) -> dict:
    steps = {k: n - before["steps_by_k"].get(k, 0) for k, n in after["steps_by_k"].items()}
    return {"controller_s": after["controller_s"] - before["controller_s"],
            "steps_by_k": {k: n for k, n in steps.items() if n}}


def run(args, out: Path) -> dict:
    from lvspec_vllm.bench.hook_ab import add_reading
    from lvspec_vllm.bench.serve_sweep import SERVE_MODES, _level, _video_urls
    from lvspec_vllm.testing.server import SERVED_NAME, vllm_server

    urls = _video_urls(16, out)
    c = args.concurrency
    spec = {"method": "lvspec", "model": args.draft, "num_speculative_tokens": 4,
            **SERVE_MODES["lvspec-auto-cold"]}
    extra = ["--max-num-seqs", str(c), "--dtype", "float32", "--max-model-len", "1024",
             "--no-enable-prefix-caching",
             "--worker-extension-cls", "lvspec_vllm.bench.hook_switch.HookSwitch"]
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_SERVER_DEV_MODE": "1"}
    units = max(args.requests // c, 1)
    with vllm_server(args.target, spec, log_path=out / "serve_ab.log", extra_args=extra,
                     env=env) as srv:
        warmup = asyncio.run(_level(srv.base_url, SERVED_NAME, urls, 2, args.warmup_requests,
                                    args.max_tokens))
        blocks = []
        for turn in range(args.turns):
            totals = {arm: {"turn": turn, "arm": arm} for arm in ARMS}
            for i in range(units):
                j = (turn * units + i) % len(ARMS)
                shift = (turn * units + i) * c % len(urls)  # the videos in turn
                for arm in ARMS[j:] + ARMS[:j]:
                    before = _arm(srv.base_url, arm)
                    r = asyncio.run(_level(srv.base_url, SERVED_NAME,
                                           urls[shift:] + urls[:shift], c, c, args.max_tokens))
                    after = _arm(srv.base_url, arm)  # (the same arm: a read)
                    add_reading(totals[arm], {"output_tokens": r["output_tokens"],
                                              "elapsed_s": r["elapsed_s"],
                                              **_between(after, before)})
            for arm in ARMS:
                b = totals[arm]
                blocks.append(b)
                print(f"[serve_ab] turn {turn} {arm}: "
                      f"{b['output_tokens'] / b['elapsed_s']:.1f} tokens/s", flush=True)
        _arm(srv.base_url, "auto")
    return {"max_num_seqs": c, "requests": units * c, "max_tokens": args.max_tokens,
            "warmup": warmup, "blocks": blocks}


def main(argv=None) -> None:
    from lvspec_vllm.bench.hook_ab import summary

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--concurrency", type=int, default=1,
                    help="requests sent at once in each unit (and the server's max-num-seqs)")
    ap.add_argument("--turns", type=int, default=8, help="each arm's blocks")
    ap.add_argument("--requests", type=int, default=16, help="requests per arm and turn")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--warmup-requests", type=int, default=8)
    ap.add_argument("--out", required=True, help="directory for serve_ab.json and the log")
    args = ap.parse_args(argv)
    if min(args.turns, args.requests, args.concurrency, args.warmup_requests) < 1:
        ap.error("--turns, --requests, --concurrency and --warmup-requests take a positive "
                 "count (the warm-up makes the controller the switch needs)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = run(args, out)
    print(summary(result))
    (out / "serve_ab.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
