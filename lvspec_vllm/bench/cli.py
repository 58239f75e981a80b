"""lvspec-bench: speculative decoding modes side by side on the world's held-out videos.

    lvspec-bench offline --target DIR --draft DIR [--modes none,strict,lvspec,no-id,no-shift,
                 no-semantic] [--k 4] [--n 64] [--max-num-seqs 8] [--lvspec-options JSON]
                 [--frames F --upscale U] [--repeat N] --out DIR
    lvspec-bench serve ...   (throughput against `vllm serve` per concurrency: see
                              lvspec_vllm/bench/serve_sweep.py or `lvspec-bench serve -h`)
    lvspec-bench project RUN.json ...   (speedup on one GPU from measured acceptance and a
                              roofline model: lvspec_vllm/bench/projection.py)

Offline, each mode runs in its own vllm.LLM process (``lvspec_vllm.bench.world_run``), one after
the other on the same machine, with the same requests (greedy, one held-out video each).
Reported:

- mean accepted length, vLLM's convention: 1 + accepted / drafts (tokens per drafting step);
  and accepted per step, SpecVLM's: accepted draft tokens / drafts;
- output tokens/s of the timed run and the speedup over "none" measured in the same invocation
  (with ``--repeat N``, every mode runs N times in rotating order and reports the median and the
  range: this machine's speed drifts between runs);
- fidelity against the target's own greedy output ("none"): attribute agreement of the parsed
  captions, and token agreement (identical outputs; matching tokens position by position);
- attribute accuracy against the ground truth;
- anchor identification precision and recall against the labelled anchor words (rows the
  verifier reached, target token labelled an anchor vs. flagged by the relevance test);
- the verifier's accepts by rule and rejections by reason;
- the draft's cost: milliseconds in the drafter per engine step (its encoder and forward passes,
  the drafter's own clock) and that time's share of the run, with the visual tokens it processed.
  ``--frames`` and ``--upscale`` lengthen every clip (looped, enlarged) to see the cost grow with
  the video.

Writes results.json, results.md and PNG plots (accepted length, fidelity) into --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lvspec_vllm.bench.world_run import MODES

RULES = ("exact", "plausible", "semantic", "shifted")
REJECTIONS = ("rejected_anchor", "rejected_guard", "rejected_no_rule", "rejected_budget",
              "rejected_entropy", "rejected_strict", "rejected_standard")


def _ratio(a, b):
    return a / b if b else None


def summarise(runs: dict[str, dict]) -> dict[str, dict]:
    from lvspec_vllm.world import data, evaluate, language

    base = runs.get("none")
    first = next(iter(runs.values()))
    skip = first.get("skip", 0)
    if any(r.get("skip", 0) != skip or r["n"] != first["n"] for r in runs.values()):
        raise ValueError("runs over different videos cannot be compared (--n, --skip)")
    held = data.held_out(skip + first["n"])[skip:]
    truth = [language.truth(s) for s in held]
    rows = {}
    for mode, r in runs.items():
        m, w = r["metrics"], r.get("worker", {})
        drafts = m.get("vllm:spec_decode_num_drafts", 0)
        accepted = m.get("vllm:spec_decode_num_accepted_tokens", 0)
        parsed = [language.parse_caption(t) for t in r["texts"]]
        row = {
            "k": r["k"],
            "mean_accepted_length": 1 + accepted / drafts if drafts else None,
            "accepted_per_step": _ratio(accepted, drafts),
            "acceptance_rate": _ratio(accepted, m.get("vllm:spec_decode_num_draft_tokens", 0)),
            "tokens_per_s": r["output_tokens"] / r["elapsed_s"],
            "tokens_per_s_range": r.get("tokens_per_s_range"),
            "output_tokens": r["output_tokens"],
            "accuracy": evaluate.accuracy(truth, parsed),
            "video_tokens": r.get("video_tokens"),
        }
        if base is not None:
            ref = [language.parse_caption(t) for t in base["texts"]]
            row["speedup"] = row["tokens_per_s"] / (base["output_tokens"] / base["elapsed_s"])
            row["fidelity_attributes"] = evaluate.accuracy(ref, parsed)["all"]
            same = [a == b for a, b in zip(base["token_ids"], r["token_ids"])]
            row["identical_outputs"] = sum(same) / len(same)
            pos = [sum(x == y for x, y in zip(a, b)) / max(len(a), 1)
                   for a, b in zip(base["token_ids"], r["token_ids"])]
            row["token_agreement"] = sum(pos) / len(pos)
        if w.get("drafter_propose_calls"):
            # the draft's own clock (drafter/timing.py), per engine step and as a share of the run
            row["draft_ms_per_step"] = w["drafter_draft_us"] / 1e3 / w["drafter_propose_calls"]
            row["draft_share"] = w["drafter_draft_us"] / 1e6 / r["elapsed_s"]
            row["draft_visual_tokens"] = w.get("drafter_visual_tokens_in", 0)
        if w:
            row["identification_precision"] = _ratio(w.get("labelled_anchor_rows", 0),
                                                     w.get("anchor_rows", 0))
            row["identification_recall"] = _ratio(w.get("labelled_anchor_rows", 0),
                                                  w.get("labelled_rows", 0))
            row["accepts"] = {k: w.get(k, 0) for k in RULES}
            row["rejections"] = {k.removeprefix("rejected_"): w.get(k, 0) for k in REJECTIONS}
        rows[mode] = row
    return rows


def merge_repeats(reps: list[dict]) -> dict:
    """One mode's repeated runs as one: the first run (greedy outputs and counters repeat), its
    throughput the median over the repeats, with their range."""
    first = reps[0]
    if len(reps) == 1:
        return first
    tps = [r["output_tokens"] / r["elapsed_s"] for r in reps]
    return {**first, "elapsed_s": first["output_tokens"] / statistics.median(tps),
            "tokens_per_s_range": [min(tps), max(tps)], "repeats": len(reps)}


def _fmt(x, pct=False):
    if x is None:
        return "–"
    return f"{100 * x:.1f} %" if pct else f"{x:.2f}"


def markdown(rows: dict[str, dict], header: str) -> str:
    lines = [header, "",
             "| mode | k | mean accepted length | accepted/step | tokens/s | speedup | "
             "attribute accuracy | fidelity (attributes) | identical outputs | token agreement | "
             "anchor precision | anchor recall |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, r in rows.items():
        spread = r.get("tokens_per_s_range")
        tps = f"{r['tokens_per_s']:.1f}" + (f" [{spread[0]:.0f}-{spread[1]:.0f}]" if spread else "")
        lines.append(
            f"| {mode} | {r['k']} | {_fmt(r['mean_accepted_length'])} | "
            f"{_fmt(r['accepted_per_step'])} | {tps} | "
            f"{_fmt(r.get('speedup'))} | {_fmt(r['accuracy']['all'], True)} | "
            f"{_fmt(r.get('fidelity_attributes'), True)} | "
            f"{_fmt(r.get('identical_outputs'), True)} | "
            f"{_fmt(r.get('token_agreement'), True)} | "
            f"{_fmt(r.get('identification_precision'), True)} | "
            f"{_fmt(r.get('identification_recall'), True)} |")
    drafted = {mode: r for mode, r in rows.items() if "draft_ms_per_step" in r}
    if drafted:
        lines += ["", "| mode | video tokens | draft ms/step | draft share of run time | "
                  "visual tokens the draft processed |", "|---|---|---|---|---|"]
    for mode, r in drafted.items():
        lines.append(f"| {mode} | {r['video_tokens']:g} | {r['draft_ms_per_step']:.2f} | "
                     f"{_fmt(r['draft_share'], True)} | {r['draft_visual_tokens']} |")
    lines += ["", "| mode | " + " | ".join(RULES) + " | " +
              " | ".join(k.removeprefix("rejected_") for k in REJECTIONS) + " |",
              "|---" * (1 + len(RULES) + len(REJECTIONS)) + "|"]
    for mode, r in rows.items():
        if "accepts" in r:
            lines.append(f"| {mode} | " + " | ".join(str(r["accepts"][k]) for k in RULES) + " | " +
                         " | ".join(str(v) for v in r["rejections"].values()) + " |")
    return "\n".join(lines) + "\n"


def plots(rows: dict[str, dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(rows)
    made = []
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(modes, [rows[m]["mean_accepted_length"] or 1.0 for m in modes], color="#4c72b0")
    ax.set_ylabel("mean accepted length")
    ax.set_title("tokens per drafting step (1 + accepted/drafts)")
    fig.tight_layout()
    fig.savefig(out / "accepted_length.png", dpi=120)
    made.append(out / "accepted_length.png")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(modes, [100 * (rows[m].get("fidelity_attributes") or 0) for m in modes],
           color="#55a868", label="attributes vs target greedy")
    ax.plot(modes, [100 * (rows[m]["accuracy"]["all"] or 0) for m in modes], "ko-",
            label="attributes vs ground truth")
    ax.set_ylabel("%")
    ax.set_ylim(0, 105)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("fidelity")
    fig.tight_layout()
    fig.savefig(out / "fidelity.png", dpi=120)
    made.append(out / "fidelity.png")
    plt.close(fig)
    return made


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="lvspec-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    off = sub.add_parser("offline", help="modes side by side through vllm.LLM")
    off.add_argument("--target", required=True)
    off.add_argument("--draft", required=True)
    off.add_argument("--modes", default=",".join(MODES))
    off.add_argument("--k", type=int, default=4)
    off.add_argument("--n", type=int, default=64)
    off.add_argument("--skip", type=int, default=0,
                     help="start after this many held-out videos, e.g. to tune on a slice "
                          "apart from the one reported")
    off.add_argument("--max-tokens", type=int, default=48)
    off.add_argument("--max-num-seqs", type=int, default=8)
    off.add_argument("--lvspec-options", default="{}")
    off.add_argument("--dtype", default="float32")
    off.add_argument("--frames", type=int, default=None,
                     help="loop each clip to this many frames (the draft's cost on long videos)")
    off.add_argument("--upscale", type=int, default=1, help="and enlarge each frame this much")
    off.add_argument("--out", type=Path, required=True)
    off.add_argument("--repeat", type=int, default=1,
                     help="run the modes N times, in rotating order; tokens/s is the median")
    off.add_argument("--reuse", action="store_true",
                     help="keep run-<mode>.json files already in --out (report again)")
    srv = sub.add_parser("serve", help="throughput per concurrency against vllm serve")
    srv.add_argument("--target", required=True)
    srv.add_argument("--draft", required=True)
    srv.add_argument("--modes", default="none,strict,lvspec,lvspec-auto")
    srv.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")],
                     default=[1, 4, 16, 64])
    srv.add_argument("--requests-per-level", type=int, default=2)
    srv.add_argument("--warmup-requests", type=int, default=2,
                     help="requests each server answers, two at a time, before the levels "
                          "(not measured; with auto_k they run its calibration)")
    srv.add_argument("--k", type=int, default=4)
    srv.add_argument("--schedule", default=None, help="vLLM's per-batch-size k, JSON")
    srv.add_argument("--lvspec-options", default="{}")
    srv.add_argument("--max-tokens", type=int, default=32)
    srv.add_argument("--dtype", default="float32")
    srv.add_argument("--ramp", action="store_true", help="levels up, then back down")
    srv.add_argument("--out", type=Path, required=True)
    srv.add_argument("--repeat", type=int, default=1,
                     help="run the modes this many times in turns; report the median per level")
    srv.add_argument("--interleave", action="store_true",
                     help="every mode's server up at once, the modes taking turns at each level "
                          "(pairs them in time; needs memory for all the servers)")
    srv.add_argument("--server-args", default="",
                     help="more `vllm serve` arguments for every mode's server, e.g. "
                          "'--max-num-batched-tokens 4096'")
    srv.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE",
                     help="environment of every mode's server, e.g. "
                          "VLLM_ENABLE_V1_MULTIPROCESSING=0 (the model in the engine core's "
                          "process, no worker process); repeatable")
    srv.add_argument("--reuse", action="store_true")
    from lvspec_vllm.bench import projection

    prj = sub.add_parser("project", help="speedup on one GPU from measured acceptance and a "
                         "roofline cost model (lvspec_vllm/bench/projection.py)")
    prj.add_argument("runs", nargs="+", help="run-<mode>.json files of lvspec-bench offline")
    prj.add_argument("--label", action="append", help="one per run, in order")
    prj.add_argument("--gpu", choices=sorted(projection.GPUS), default="h100-sxm")
    prj.add_argument("--pair", choices=sorted(projection.PAIRS), default="qwen2.5-vl-32b")
    prj.add_argument("--weight-bytes", type=float, default=1.0, help="1: FP8, 2: bf16")
    prj.add_argument("--context", type=int, default=8192, help="tokens per request")
    prj.add_argument("--concurrency", type=lambda v: [int(x) for x in v.split(",")],
                     default=[1, 4, 16, 64])
    args = ap.parse_args(argv)
    if args.command == "project":
        return projection.main(args)
    if args.command == "serve":
        from lvspec_vllm.bench import serve_sweep

        return serve_sweep.main(args)

    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        off.error(f"unknown mode {unknown[0]!r}; modes: {', '.join(MODES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    reps = {mode: [] for mode in modes}
    # The machine's speed drifts between runs; repeats rotate the order so that no mode always
    # runs first (or last), and each reports the median.
    order = [(r, modes[(i + r) % len(modes)]) for r in range(args.repeat)
             for i in range(len(modes))]
    for i, (r, mode) in enumerate(order, 1):
        t0 = time.time()
        name = f"run-{mode}" + (f"-{r + 1}" if r else "")
        path = args.out / f"{name}.json"
        if args.reuse and path.exists():
            reps[mode].append(json.loads(path.read_text()))
            continue
        print(f"[lvspec-bench] {i}/{len(order)} {mode} ...", flush=True)
        cmd = [sys.executable, "-m", "lvspec_vllm.bench.world_run", "--target", args.target,
               "--draft", args.draft, "--mode", mode, "--k", str(args.k), "--n", str(args.n),
               "--skip", str(args.skip),
               "--max-tokens", str(args.max_tokens), "--max-num-seqs", str(args.max_num_seqs),
               "--lvspec-options", args.lvspec_options, "--dtype", args.dtype, "--out", str(path),
               "--upscale", str(args.upscale)]
        cmd += ["--frames", str(args.frames)] if args.frames else []
        with open(args.out / f"{name}.log", "w") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            sys.exit(f"[lvspec-bench] mode {mode} failed ({proc.returncode}); see "
                     f"{args.out / f'{name}.log'}")
        run = json.loads(path.read_text())
        reps[mode].append(run)
        print(f"[lvspec-bench]   done in {time.time() - t0:.0f}s: "
              f"{run['output_tokens'] / run['elapsed_s']:.1f} tokens/s", flush=True)
    rows = summarise({mode: merge_repeats(reps[mode]) for mode in modes})
    shape = "" if not (args.frames or args.upscale > 1) else \
        f" (looped to {args.frames or 'the same'} frames, enlarged {args.upscale}x)"
    skipped = f" after the first {args.skip}" if args.skip else ""
    header = (f"target `{args.target}`, draft `{args.draft}`, k={args.k}, {args.n} held-out "
              f"videos{skipped}{shape}, max_num_seqs={args.max_num_seqs}, dtype {args.dtype}, "
              f"greedy")
    if args.repeat > 1:
        header += f"; each mode {args.repeat} times in rotating order, tokens/s median [range]"
    md = markdown(rows, header)
    (args.out / "results.json").write_text(json.dumps(
        {"config": vars(args) | {"out": str(args.out)}, "modes": rows}, indent=1))
    (args.out / "results.md").write_text(md)
    made = plots(rows, args.out)
    print(md)
    print(f"[lvspec-bench] wrote {args.out / 'results.json'}, results.md, "
          f"{', '.join(p.name for p in made)}")


if __name__ == "__main__":
    main()
