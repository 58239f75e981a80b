"""Throughput under concurrent load against `vllm serve` on 127.0.0.1, per speculative mode.

    lvspec-bench serve --target DIR --draft DIR [--modes none,strict,lvspec,lvspec-auto]
                       [--concurrency 1,4,16,64] [--requests-per-level 2] [--k 4]
                       [--schedule JSON] [--repeat 1] [--interleave] [--warmup-requests 2]
                       [--server-args ARGS] [--server-env KEY=VALUE ...] --out DIR

For each mode one server is started; for each concurrency level, ``requests-per-level x
concurrency`` chat requests (one held-out world video each, greedy, a fixed number of output
tokens) are sent by that many concurrent clients, and output tokens/s is the completion tokens
over the level's wall time. ``/metrics`` is read before and after each level: drafts, accepted
tokens, the draft's own seconds (its share of the level's wall time) and the steps it skipped,
and under ``auto_k`` the steps per chosen k; vLLM's latency histograms give per level where a
request's time went, and by Little's law how many requests were inside vLLM on average; the
CPU seconds of the client and of the server's processes (API server, engine core, worker) give
where the level's CPU went. Each server first answers ``--warmup-requests`` requests, two at
a time, which are not measured (their throughput is kept in the mode's JSON as ``warmup``):
one-off costs, and with ``auto_k`` its calibration (48 engine steps), which a server that runs
for hours pays once. With ``--ramp`` the levels run up and back down
(1, 4, 16, 64, 16, 4, 1) on one server, which is how a collapse at a threshold would show. With
``--repeat N`` the modes run N times in turns and each level reports the median and the range,
and its speedup over none as the median of each round's ratio. With ``--interleave`` every
mode's server is up at once and the modes take turns at each level (``run_interleaved``).

Modes: none (no speculation), strict (LVSpec strict, fixed k), lvspec (loose, fixed k),
lvspec-k1 and lvspec-k2 (loose, k fixed at 1 or 2 whatever --k says), lvspec-schedule (loose,
vLLM's per-batch-size schedule from --schedule), lvspec-auto (loose, auto_k);
lvspec-schedule-eager and lvspec-auto-eager run a draft forward in every k = 0 step,
as vLLM does (``draft_catch_up`` off); lvspec-schedule-cold and lvspec-auto-cold never run the
draft for requests admitted at k = 0 (``draft_cold_requests``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import shlex
import time
from pathlib import Path

from lvspec_vllm.metrics import PUBLISH_INTERVAL_S

SERVE_MODES = {
    "none": None,
    "strict": {},
    "lvspec": {"loose": True},
    "lvspec-schedule": {"loose": True},
    "lvspec-auto": {"loose": True, "auto_k": True},
    # fixed k below --k, so that the best fixed k runs in the same turns as auto_k
    "lvspec-k1": {"loose": True, "num_speculative_tokens": 1},
    "lvspec-k2": {"loose": True, "num_speculative_tokens": 2},
    # the same with vLLM's draft forward in every k = 0 step (no deferred draft passes)
    "lvspec-schedule-eager": {"loose": True, "draft_catch_up": False},
    "lvspec-auto-eager": {"loose": True, "auto_k": True, "draft_catch_up": False},
    # requests admitted at k = 0 never run the draft (draft_cold_requests)
    "lvspec-schedule-cold": {"loose": True, "draft_cold_requests": True},
    "lvspec-auto-cold": {"loose": True, "auto_k": True, "draft_cold_requests": True},
}


def _video_urls(n: int, work: Path) -> list[str]:
    from lvspec_vllm.testing.media import write_mp4
    from lvspec_vllm.world import data, scenes

    urls = []
    for i, scene in enumerate(data.held_out(n)):
        mp4 = write_mp4(str(work / f"v{i}.mp4"), scenes.render(scene), fps=scenes.FPS)
        urls.append("data:video/mp4;base64," + base64.b64encode(Path(mp4).read_bytes()).decode())
    return urls


async def _level(base_url: str, served: str, urls: list[str], concurrency: int, n: int,
                 max_tokens: int) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=1800)
    sem = asyncio.Semaphore(concurrency)

    async def one(i):
        async with sem:
            r = await client.chat.completions.create(
                model=served, max_tokens=max_tokens, temperature=0.0,
                extra_body={"ignore_eos": True},
                messages=[{"role": "user", "content": [
                    {"type": "video_url", "video_url": {"url": urls[i % len(urls)]}},
                    {"type": "text", "text": "Describe this video."}]}])
            return r.usage.completion_tokens

    started, t0 = time.time(), time.perf_counter()
    try:
        tokens = await asyncio.gather(*(one(i) for i in range(n)))
    finally:
        await client.close()
    elapsed = time.perf_counter() - t0
    return {"concurrency": concurrency, "requests": n, "output_tokens": sum(tokens),
            "started": started, "elapsed_s": elapsed, "tokens_per_s": sum(tokens) / elapsed}


def _delta(after: dict, before: dict, prefix: str) -> dict:
    return {k: after[k] - before.get(k, 0.0) for k in after if k.startswith(prefix)}


def _levels(args) -> list[int]:
    levels = list(args.concurrency)
    return levels + levels[-2::-1] if args.ramp else levels


@contextlib.contextmanager
def mode_server(mode: str, args, urls: list[str], out: Path, tag: str = ""):
    """One mode's server, warmed up: (server, its speculative config)."""
    from lvspec_vllm.testing.server import SERVED_NAME, vllm_server

    options = SERVE_MODES[mode]
    spec = None
    extra = ["--max-num-seqs", str(max(args.concurrency)), "--dtype", args.dtype,
             "--max-model-len", "1024", "--no-enable-prefix-caching",
             *shlex.split(args.server_args)]
    if options is not None:
        spec = {"method": "lvspec", "model": args.draft, "num_speculative_tokens": args.k,
                **json.loads(args.lvspec_options), **options}
        if mode == "strict":
            spec["loose"] = False
        if mode.startswith("lvspec-schedule"):
            spec["num_speculative_tokens_per_batch_size"] = json.loads(args.schedule)
    env = dict(item.split("=", 1) for item in args.server_env)
    with vllm_server(args.target, spec, log_path=out / f"serve-{mode}{tag}.log",
                     extra_args=extra, env=env) as srv:
        # warm-up: first requests pay one-off costs (media decoding paths, allocator growth;
        # with auto_k its calibration, 48 engine steps, and first fits); kept, not measured
        warmup = asyncio.run(_level(srv.base_url, SERVED_NAME, urls, 2, args.warmup_requests,
                                    args.max_tokens))
        yield srv, spec, warmup


def run_mode(mode: str, args, urls: list[str], out: Path, tag: str = "") -> dict:
    """Every level on one server of this mode."""
    with mode_server(mode, args, urls, out, tag) as (srv, spec, warmup):
        results = [_measured_level(srv, args, urls, mode, c) for c in _levels(args)]
    return {"mode": mode, "speculative_config": spec, "warmup": warmup, "levels": results}


def run_interleaved(modes: list[str], args, urls: list[str], out: Path, tag: str = "",
                    turn: int = 0) -> dict[str, dict]:
    """Every mode's server up at once, the modes taking turns at each level (the order
    rotating from level to level and from round to round), so that modes compared at a
    level ran seconds apart, not a whole sweep apart: on a machine whose speed drifts over
    minutes, that pairs them in time. An idle server waits on its input queue."""
    with contextlib.ExitStack() as stack:
        servers = {m: stack.enter_context(mode_server(m, args, urls, out, tag)) for m in modes}
        results: dict[str, list[dict]] = {m: [] for m in modes}
        for j, c in enumerate(_levels(args)):
            shift = (j + turn) % len(modes)
            for m in modes[shift:] + modes[:shift]:
                results[m].append(_measured_level(servers[m][0], args, urls, m, c))
    return {m: {"mode": m, "speculative_config": servers[m][1], "warmup": servers[m][2],
                "levels": results[m]} for m in modes}


def _measured_level(srv, args, urls: list[str], mode: str, c: int) -> dict:
    """One level's throughput, with what /metrics counted during it."""
    from lvspec_vllm.testing.server import SERVED_NAME

    before, k_before = srv.metrics(), _k_steps(srv.base_url)
    cpu_before = _cpu_seconds(srv.process.pid)
    r = asyncio.run(_level(srv.base_url, SERVED_NAME, urls, c,
                           args.requests_per_level * c, args.max_tokens))
    cpu_after = _cpu_seconds(srv.process.pid)
    time.sleep(2 * PUBLISH_INTERVAL_S)  # the workers' last counts reach /metrics
    after, k_after = srv.metrics(), _k_steps(srv.base_url)
    r["cpu_s"] = {part: cpu_after[part] - cpu_before.get(part, 0.0) for part in cpu_after}
    drafter = _delta(after, before, "lvspec:draft_")
    r["draft_share"] = drafter.get("lvspec:draft_seconds_total", 0.0) / r["elapsed_s"]
    r["draft_skipped_steps"] = drafter.get("lvspec:draft_skipped_steps_total", 0.0)
    r["draft_plain_steps"] = drafter.get("lvspec:draft_plain_steps_total", 0.0)
    d = _delta(after, before, "vllm:spec_decode_num")
    drafts = d.get("vllm:spec_decode_num_drafts_total", 0.0)
    accepted = d.get("vllm:spec_decode_num_accepted_tokens_total", 0.0)
    r["mean_accepted_length"] = 1 + accepted / drafts if drafts else None
    steps = {k: n - k_before.get(k, 0.0) for k, n in k_after.items()}
    steps = {k: n for k, n in steps.items() if n > 0}
    r["auto_k_steps"] = steps
    price = after.get("lvspec:auto_k_draft_prompt_token_seconds")  # cold requests
    r["draft_prompt_token_us"] = price * 1e6 if price else None
    r["mean_k"] = (sum(k * n for k, n in steps.items()) / sum(steps.values())
                   if steps else None)
    r.update(_latencies(after, before))
    # Little's law: requests inside vLLM (arrival to finish) on average over the level; below
    # the concurrency, the clients' requests spent the rest in the HTTP path and the media
    # decoding before vLLM's clock starts, or in the client
    r["in_engine"] = r["requests"] * r["e2e_ms"] / 1e3 / r["elapsed_s"] if r["e2e_ms"] else None
    print(f"[lvspec-bench serve] {mode} concurrency {c}: {r['tokens_per_s']:.1f} "
          f"tokens/s", flush=True)
    return r


# vLLM's per-request histograms, as a mean per level: where a request's time went (the API
# server's preprocessing, video decoding included, is in TTFT and e2e but not in prefill).
LATENCIES = {
    "ttft_ms": "vllm:time_to_first_token_seconds",
    "queue_ms": "vllm:request_queue_time_seconds",
    "prefill_ms": "vllm:request_prefill_time_seconds",
    "decode_ms": "vllm:request_decode_time_seconds",
    "e2e_ms": "vllm:e2e_request_latency_seconds",
}


def _latencies(after: dict, before: dict) -> dict:
    out = {}
    for key, name in LATENCIES.items():
        d = _delta(after, before, name)
        n = d.get(f"{name}_count", 0.0)
        out[key] = 1e3 * d.get(f"{name}_sum", 0.0) / n if n else None
    return out


# a server's processes by their names' prefixes (the API server is the root)
CPU_PARTS = {"VLLM::EngineCor": "engine_core", "VLLM::Worker": "worker"}


def _cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds (user + system) so far of this client process and of the server's process
    tree by part: client, api_server, engine_core, worker, other. On a host whose CPUs they
    share, this is where a level's CPU went."""
    import psutil

    out = {"client": time.process_time(), "api_server": 0.0, "engine_core": 0.0,
           "worker": 0.0, "other": 0.0}
    root = psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        try:
            times, name = proc.cpu_times(), proc.name()
        except psutil.NoSuchProcess:
            continue
        part = "api_server" if proc.pid == pid else next(
            (v for k, v in CPU_PARTS.items() if name.startswith(k)), "other")
        out[part] += times.user + times.system
    return out


def _k_steps(base_url: str) -> dict[int, float]:
    """lvspec:auto_k_steps_total by its k label (empty without auto_k)."""
    import re
    import urllib.request

    text = urllib.request.urlopen(f"{base_url}/metrics", timeout=10).read().decode()
    return {int(k): float(v) for k, v in
            re.findall(r'^lvspec:auto_k_steps_total\{k="(\d+)"\} (\S+)$', text, re.M)}


def median_run(reps: list[dict], base: list[dict] | None = None) -> dict:
    """One mode's repeats as one run: per level the median of each measure (the throughput of
    every repeat kept beside it). With ``base`` (none's repeats, round by round) also each
    round's speedup over it at the level, and their median: a ratio of modes that ran close
    in time, which the machine's drift between rounds does not enter."""
    import statistics

    def median(values):
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    levels = []
    for i, first in enumerate(reps[0]["levels"]):
        same = [r["levels"][i] for r in reps]
        levels.append({**first, **{key: median(lv.get(key) for lv in same) for key in (
            "tokens_per_s", "mean_accepted_length", "mean_k", "draft_share",
            "draft_skipped_steps", "draft_plain_steps", "draft_prompt_token_us", "in_engine",
            *LATENCIES)},
            "tokens_per_s_runs": [lv["tokens_per_s"] for lv in same]})
        cpu = [lv["cpu_s"] for lv in same if lv.get("cpu_s")]
        if cpu:  # per part, the median over the repeats
            levels[-1]["cpu_s"] = {part: median(c.get(part) for c in cpu) for part in cpu[0]}
        if base is not None:
            ratios = [lv["tokens_per_s"] / b["levels"][i]["tokens_per_s"]
                      for lv, b in zip(same, base)]
            levels[-1].update(speedup=median(ratios), speedup_runs=ratios)
    return {**reps[0], "levels": levels, "repeats": len(reps)}


def markdown(runs: list[dict], header: str) -> str:
    levels = [lv["concurrency"] for lv in runs[0]["levels"]]
    base = next((r for r in runs if r["mode"] == "none"), None)
    lines = [header, "", "output tokens/s (speedup over none; mean accepted length; mean k)", "",
             "| mode | " + " | ".join(f"c={c}" for c in levels) + " |",
             "|---" * (len(levels) + 1) + "|"]
    for r in runs:
        cells = []
        for i, lv in enumerate(r["levels"]):
            cell = f"{lv['tokens_per_s']:.1f}"
            each = lv.get("tokens_per_s_runs", [])
            if len(each) > 1:
                cell += f" [{min(each):.0f}-{max(each):.0f}]"
            notes = []
            if lv.get("speedup") is not None:
                notes.append(f"{lv['speedup']:.2f}x")
            elif base is not None:
                notes.append(f"{lv['tokens_per_s'] / base['levels'][i]['tokens_per_s']:.2f}x")
            if lv["mean_accepted_length"]:
                notes.append(f"{lv['mean_accepted_length']:.2f}")
            if lv["mean_k"] is not None:
                notes.append(f"k {lv['mean_k']:.1f}")
            if notes:
                cell += f" ({'; '.join(notes)})"
            cells.append(cell)
        lines.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    lines += ["", "the draft's share of wall time (lvspec:draft_seconds_total over the level's "
              "time; steps in which the draft ran no forward / of them on vLLM's plain path)",
              "", lines[4], lines[5]]
    for r in runs:
        if r["mode"] != "none":
            lines.append(f"| {r['mode']} | " + " | ".join(
                f"{lv.get('draft_share') or 0:.0%} ({lv.get('draft_skipped_steps') or 0:.0f} / "
                f"{lv.get('draft_plain_steps') or 0:.0f})" for lv in r["levels"]) + " |")
    if any(lv.get("e2e_ms") is not None for r in runs for lv in r["levels"]):
        lines += ["", "per request, mean ms: time to first token / of it in prefill / decode "
                  "(vLLM's histograms)", "", lines[4], lines[5]]
        for r in runs:
            lines.append(f"| {r['mode']} | " + " | ".join(
                " / ".join("–" if lv.get(key) is None else f"{lv[key]:.0f}"
                           for key in ("ttft_ms", "prefill_ms", "decode_ms"))
                for lv in r["levels"]) + " |")
    if any(lv.get("cpu_s") for r in runs for lv in r["levels"]):
        lines += ["", "per request, CPU ms: the client / vLLM's API server / engine core / "
                  "worker; requests inside vLLM on average (Little's law, of the concurrency)",
                  "", lines[4], lines[5]]
        for r in runs:
            cells = []
            for lv in r["levels"]:
                cpu = lv.get("cpu_s") or {}
                cell = " / ".join("–" if cpu.get(part) is None else
                                  f"{1e3 * cpu[part] / lv['requests']:.0f}"
                                  for part in ("client", "api_server", "engine_core", "worker"))
                if lv.get("in_engine") is not None:
                    cell += f"; {lv['in_engine']:.1f}"
                cells.append(cell)
            lines.append(f"| {r['mode']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot(runs: list[dict], key: str, ylabel: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for r in runs:
        ax.plot(range(len(r["levels"])), [lv[key] or 0 for lv in r["levels"]], "o-",
                label=r["mode"])
    ax.set_xticks(range(len(runs[0]["levels"])),
                  [str(lv["concurrency"]) for lv in runs[0]["levels"]])
    ax.set_xlabel("concurrent requests (in run order)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plots(runs: list[dict], out: Path) -> list[Path]:
    made = [_plot(runs, "tokens_per_s", "output tokens/s", out / "throughput.png")]
    auto = [r for r in runs if any(lv["mean_k"] is not None for lv in r["levels"])]
    if auto:
        made.append(_plot(auto, "mean_k", "mean k per step", out / "k_chosen.png"))
    return made


def main(args) -> None:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    modes = args.modes.split(",")
    bad = [item for item in args.server_env if "=" not in item]
    if bad:
        raise SystemExit(f"--server-env takes KEY=VALUE, got {bad[0]!r}")
    unknown = [m for m in modes if m not in SERVE_MODES]
    if unknown:
        raise SystemExit(f"unknown serve mode {unknown[0]!r}; modes: {', '.join(SERVE_MODES)}")
    if any(m.startswith("lvspec-schedule") for m in modes) and not args.schedule:
        raise SystemExit("mode lvspec-schedule needs --schedule, e.g. '[[1, 4, 4], [5, 256, 0]]'")
    urls = _video_urls(16, out)
    # With --repeat the modes take turns, so a drift of the machine's speed hits every mode
    # alike; each level reports the median over the repeats. --interleave: turns per level.
    reps: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(args.repeat):
        tag = f"-r{i}" if args.repeat > 1 else ""
        paths = {m: out / f"serve-{m}{tag}.json" for m in modes}
        if args.interleave:
            if args.reuse and all(path.exists() for path in paths.values()):
                done = {m: json.loads(path.read_text()) for m, path in paths.items()}
            else:
                done = run_interleaved(modes, args, urls, out, tag, turn=i)
                for m, path in paths.items():
                    path.write_text(json.dumps(done[m]))
            for m in modes:
                reps[m].append(done[m])
            continue
        for mode in modes:
            path = paths[mode]
            if args.reuse and path.exists():
                reps[mode].append(json.loads(path.read_text()))
                continue
            reps[mode].append(run_mode(mode, args, urls, out, tag))
            path.write_text(json.dumps(reps[mode][-1]))
    runs = [median_run(reps[m], reps.get("none")) for m in modes]
    header = (f"`vllm serve` on 127.0.0.1: target `{args.target}`, draft `{args.draft}`, "
              f"k={args.k}, {args.requests_per_level} x concurrency requests per level, "
              f"{args.max_tokens} output tokens each (greedy), dtype {args.dtype}, after "
              f"{args.warmup_requests} warm-up requests per server")
    if args.repeat > 1:
        header += (f"; each mode {args.repeat} times, in turns"
                   f"{' at every level' if args.interleave else ''}, median [range] per level, "
                   f"speedup the median of each round's ratio to none")
    if any(m.startswith("lvspec-schedule") for m in modes):
        header += f", schedule {args.schedule}"
    if args.server_args:
        header += f", server arguments `{args.server_args}`"
    if args.server_env:
        header += f", server environment `{' '.join(args.server_env)}`"
    if json.loads(args.lvspec_options):
        header += f", LVSpec options {args.lvspec_options}"
    md = markdown(runs, header)
    (out / "serve.md").write_text(md)
    config = {k: str(v) for k, v in vars(args).items()}
    (out / "serve.json").write_text(json.dumps({"config": config, "runs": runs}, indent=1))
    made = plots(runs, out)
    print(md)
    print(f"[lvspec-bench serve] wrote {out / 'serve.json'}, serve.md, "
          f"{', '.join(p.name for p in made)}")
