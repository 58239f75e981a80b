"""What auto_k saw, per step: ``python -m lvspec_vllm.bench.auto_k_trace TRACE [--fit-at B]
[--batches LO-HI]``.

TRACE is the file a run wrote with ``LVSPEC_AUTO_K_TRACE`` set (``patches/scheduler.py``): one
JSON line per engine step, ``[batch, k, prefill tokens, seconds, previous step's k, share of
decode rows that drafted, wall seconds, the table's k, share of running requests that would
draft, output tokens]`` (older traces stop earlier; without the wall seconds, their seconds
are the wall time of the steps that were samples). Printed: the share of wall time in steps
that computed prefill chunks and in explorations (steps at a k off the table, and the step
after each), and per batch size and k the median time of the whole decode-only steps auto_k
fits (k kept from the step before, every decode row drafting), beside the steps it leaves
out, and with output tokens in the trace what those steps emitted (tokens a row, wall ms per
token: the goodput auto_k's model predicts). With ``--fit-at B``: the step-cost fit of the
trace's samples, its levels at batch size B beside the medians of the steps kept there
(``refit``). With ``--batches LO-HI``: where the time went at those batch sizes, by kind of
step (``time_by_kind``), and where the table's k is 0 what the explorations took beyond its
own steps' seconds per output token (``exploration_cost``). Also printed: per doubling of the
batch size and k, the output tokens per drafting row (``drafting_rows``), and at one request
the acceptance per draft position and along a request (``acceptance_at_one``).
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def _wall(row: list) -> float | None:
    return row[6] if len(row) > 7 else row[3]


def _exploring(lines: list[list]):
    """Each row with whether it is an exploration's: a step at a k off the table (traces that
    have the table's k), or the step after one, which pays for the switch back."""
    after = False
    for row in lines:
        off = len(row) > 7 and row[1] != row[7]
        yield row, off or after
        after = off


def summarise(lines: list[list]) -> dict:
    steps = [row for row in lines if _wall(row) is not None]
    total = sum(_wall(row) for row in steps)
    prefill = [row for row in steps if row[2] > 0]
    explored = [_wall(row) for row, exploring in _exploring(lines)
                if exploring and _wall(row) is not None]
    decode = defaultdict(list)
    emitted = defaultdict(list)  # (batch, k) -> (tokens, seconds) of its whole steps
    cold = defaultdict(lambda: defaultdict(list))  # (batch, k) -> kind -> seconds
    # samples at k > 0 by the share of decode rows that drafted (cold requests)
    shares = {"whole": 0, "partly cold": 0, "all cold": 0}
    for row in steps:
        batch, k, p, seconds, previous, *share = row
        # older traces have 5 fields: a sample kept the previous k
        s = share[0] if share else (1.0 if k == previous else None)
        kind = None if not k or s is None else \
            "whole" if s == 1.0 else "partly cold" if s > 0 else "all cold"
        if kind:
            shares[kind] += 1
        # the medians are of whole steps at k (and apart, of the partly and all cold ones)
        if p == 0 and k == previous and s == 1.0:
            decode[(batch, k)].append(seconds)
            if len(row) > 9:
                emitted[(batch, k)].append((row[9], seconds))
        elif p == 0 and kind:
            cold[(batch, k)][kind].append(_wall(row))
    return {
        "steps": len(steps), "seconds": total,
        "prefill_steps": len(prefill),
        "prefill_share": sum(_wall(row) for row in prefill) / total if total else 0.0,
        "exploration_steps": len(explored),
        "exploration_share": sum(explored) / total if total else 0.0,
        "k_above_0_samples": shares,
        "decode_ms": {f"{b},{k}": (len(v), 1e3 * statistics.median(v))
                      for (b, k), v in sorted(decode.items())},
        # what the whole steps emitted: output tokens a row, and wall ms per output token
        "tokens": {f"{b},{k}": (sum(n for n, _ in v) / (b * len(v)),
                                1e3 * sum(t for _, t in v) / max(sum(n for n, _ in v), 1))
                   for (b, k), v in sorted(emitted.items())},
        "cold_ms": {f"{b},{k}": {kind: (len(v), 1e3 * statistics.median(v))
                                 for kind, v in kinds.items()}
                    for (b, k), kinds in sorted(cold.items())},
    }


def _kind(row: list) -> str:
    k, previous = row[1], row[4]
    share = row[5] if len(row) > 5 else (1.0 if k == previous else None)
    if k == 0:
        return "k = 0" if previous == 0 else "switch"
    if share is None:
        return "switch"
    return "whole" if share == 1.0 else "all cold" if share == 0 else "partly cold"


def time_by_kind(lines: list[list], lo: int, hi: int) -> dict:
    """Of the timed steps at batch sizes ``lo``-``hi``: per (kind, decode or prefill, chosen by
    the table or an exploration) the steps, their share of the time, ms per step and, with
    output tokens in the trace, ms per output token. Kinds: k = 0, whole (k > 0, every decode
    row drafting), partly cold, all cold, switch (k differs from the step before)."""
    groups = defaultdict(lambda: [0, 0.0, 0])
    for row in lines:
        wall = _wall(row)
        if not lo <= row[0] <= hi or wall is None:
            continue
        source = "exploration" if len(row) > 7 and row[1] != row[7] else "table"
        g = groups[(_kind(row), "prefill" if row[2] > 0 else "decode", source)]
        g[0] += 1
        g[1] += wall
        g[2] += row[9] if len(row) > 9 else 0
    total = sum(g[1] for g in groups.values()) or 1.0
    return {key: (n, t / total, 1e3 * t / n, 1e3 * t / tokens if tokens else None)
            for key, (n, t, tokens) in sorted(groups.items(), key=lambda kv: -kv[1][1])}


def acceptance_at_one(lines: list[list], span: int = 8) -> dict[int, dict]:
    """Per k > 0, from the whole decode-only steps at batch size 1 (one row: the step's output
    tokens are 1 + its accepted drafts): how many steps emitted 1..k+1 tokens, the acceptance
    per draft position they imply (``AcceptanceProfile``'s alpha, from these steps alone), and
    by the request's output so far (``span`` tokens a bucket, counted from its prefill step
    at batch size 1) the steps and their mean output tokens: acceptance that changes along a
    request weighs differently where drafting covers only part of it."""
    counts = defaultdict(lambda: defaultdict(int))
    along = defaultdict(lambda: defaultdict(list))
    done = None  # output tokens of the request running alone, since its prefill step
    for row in lines:
        if row[0] != 1 or len(row) <= 9:
            done = None
            continue
        if row[2] > 0:
            done = row[9]
            continue
        if row[1] > 0 and row[1] == row[4] and row[5] == 1.0:
            counts[row[1]][min(row[9], row[1] + 1)] += 1
            if done is not None:
                along[row[1]][done // span].append(row[9])
        if done is not None:
            done += row[9]
    out = {}
    for k, c in sorted(counts.items()):
        emitted = [c[n] for n in range(1, k + 2)]
        alpha, reached = [], sum(emitted)
        for j in range(1, k + 1):
            passed = sum(emitted[j:])
            alpha.append(passed / reached if reached else None)
            reached = passed
        out[k] = {"emitted": emitted, "alpha": alpha,
                  "along": [(q * span, len(v), sum(v) / len(v))
                            for q, v in sorted(along[k].items())]}
    return out


def drafting_rows(lines: list[list]) -> dict[tuple[int, int], tuple[int, float, float]]:
    """Per (batch sizes of one doubling, by their smallest: 1, 2, 4, ...; k > 0), from the
    decode-only steps that kept k and in which some rows drafted (whole and partly cold): the
    steps, the drafting rows, and the output tokens per drafting row (1 + its accepted drafts;
    a cold row emits one token). What ``auto_k``'s acceptance per batch size
    (``Acceptance``, its drafts at every position) reads there, from the steps' own outcomes."""
    groups = defaultdict(lambda: [0, 0.0, 0.0])
    for row in lines:
        if len(row) <= 9 or row[2] or not row[1] or row[1] != row[4] or not row[5]:
            continue
        batch, share = row[0], row[5]
        g = groups[(1 << (batch.bit_length() - 1), row[1])]
        g[0] += 1
        g[1] += share * batch
        g[2] += row[9] - batch * (1 - share)  # the cold rows' one token each
    return {key: (n, rows, tokens / rows) for key, (n, rows, tokens) in sorted(groups.items())}


def refit(lines: list[list], batch: int, own_samples: int | None = None) -> dict:
    """The trace's samples fed to ``StepCostModel`` as the controller kept them (a step at the
    previous step's k, its share of drafting rows, not the first decode-only step at its k),
    and its levels at ``batch`` after the last one, beside the median of the whole decode-only
    steps kept at that batch size per k. Unlike the controller's, in the seconds the steps took,
    not at the engine's pace (``AutoK.pace``: a fit's levels are needed to read it), and with
    no dip rule (``AutoK.transient_decay``).
    ``own_samples`` (None: the model's default) is ``StepCostModel.own_samples``; a huge one
    gives the regression alone."""
    import numpy as np

    from lvspec_vllm.auto_k import StepCostModel

    k_max = max(row[1] for row in lines)
    max_batch = max(row[0] for row in lines)
    extra = {} if own_samples is None else {"own_samples": own_samples}
    model = StepCostModel(k_max, max_batch, split_prefill=True, guess=False, **extra)
    ran = set()  # the k of the decode-only steps sampled (AutoK._ran_before)
    for row in lines:
        b, k, p, seconds, previous = row[:5]
        share = row[5] if len(row) > 5 and row[5] is not None else 1.0
        if seconds is not None and k == previous and (p or k in ran):
            model.add(b, k, seconds, p, share)
        elif seconds is not None and k == previous:
            ran.add(k)
    fitted = model.fit()
    medians = {k: float(np.median(t)) for k, t in model.own_steps(batch).items()}
    return {"levels_ms": [round(1e3 * float(t), 2) for t in fitted.times[fitted.index(batch)]],
            "kept_medians_ms": {k: round(1e3 * t, 2) for k, t in medians.items()}}


def exploration_cost(lines: list[list], lo: int, hi: int) -> dict | None:
    """Of the timed steps at batch sizes ``lo``-``hi`` where the table's k is 0 (traces with
    output tokens): the explorations' steps and the step after each, their share of the time,
    and what they took beyond the table's own steps' measured seconds per output token for the
    tokens they emitted, as a share of the time (what ``AutoK``'s budget would read if it
    priced them by the table's realised steps instead of the fit). None: no table step
    there."""
    total, table, explored = 0.0, [0.0, 0], []
    for row, exploring in _exploring(lines):
        wall = _wall(row)
        if len(row) > 9 and wall is not None and lo <= row[0] <= hi:
            total += wall
            if row[7] == 0 and row[9]:
                if exploring:
                    explored.append((wall, row[9]))
                else:
                    table[0] += wall
                    table[1] += row[9]
    if not table[1] or not total:
        return None
    per_token = table[0] / table[1]
    return {"steps": len(explored), "share": sum(w for w, _ in explored) / total,
            "beyond": sum(w - n * per_token for w, n in explored) / total,
            "table_ms_per_token": 1e3 * per_token}


def main(argv=None) -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--fit-at", type=int, default=None, metavar="BATCH",
                    help="refit the trace's samples and print the levels at this batch size")
    ap.add_argument("--own-samples", type=int, default=None,
                    help="StepCostModel.own_samples for --fit-at (a huge one: regression only)")
    ap.add_argument("--batches", default=None, metavar="LO-HI",
                    help="where the time went at these batch sizes, by kind of step")
    args = ap.parse_args(argv)
    with open(args.trace) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if args.batches is not None:
        lo, _, hi = args.batches.partition("-")
        print(f"batch sizes {args.batches}: kind, decode or prefill, chosen by: steps, share of "
              "the time, ms a step (ms an output token)")
        for key, (n, share, ms, per_token) in time_by_kind(lines, int(lo),
                                                          int(hi or lo)).items():
            tail = f" ({per_token:.2f})" if per_token is not None else ""
            print(f"  {', '.join(key)}: {n}, {100 * share:.1f} %, {ms:.2f}{tail}")
        cost = exploration_cost(lines, int(lo), int(hi or lo))
        if cost is not None:
            print(f"where the table's k is 0: {cost['steps']} steps of explorations and the step "
                  f"after each, {100 * cost['share']:.1f} % of the time, "
                  f"{100 * cost['beyond']:.1f} % beyond the table's own "
                  f"{cost['table_ms_per_token']:.2f} ms an output token")
        return
    if args.fit_at is not None:
        r = refit(lines, args.fit_at, args.own_samples)
        print(f"batch {args.fit_at}: fitted step ms by k {r['levels_ms']}; median of the whole "
              f"decode-only steps kept there, by k: {r['kept_medians_ms']}")
        return
    s = summarise(lines)
    print(f"{s['steps']} steps, {s['seconds']:.3f} s; {s['prefill_steps']} with prefill chunks: "
          f"{100 * s['prefill_share']:.0f} % of the time; {s['exploration_steps']} in "
          f"explorations and after them: {100 * s['exploration_share']:.0f} %")
    print("samples at k > 0 by the share of decode rows that drafted: "
          + ", ".join(f"{n} {kind}" for kind, n in s["k_above_0_samples"].items()))
    print("batch, k: decode-only steps that kept the previous k, median ms (whole steps; "
          "beside them the partly and all cold ones)")
    keys = sorted({*s["decode_ms"], *s["cold_ms"]}, key=lambda key: tuple(map(int, key.split(","))))
    for key in keys:
        n, ms = s["decode_ms"].get(key, (0, None))
        line = f"  {key}: {n} steps" + (f", {ms:.2f} ms" if n else "")
        if key in s["tokens"]:
            line += " ({:.2f} tokens a row, {:.2f} ms a token)".format(*s["tokens"][key])
        for kind, (m, cold_ms) in sorted(s["cold_ms"].get(key, {}).items(), reverse=True):
            line += f"; {m} {kind}, {cold_ms:.2f} ms"
        print(line)
    drafting = drafting_rows(lines)
    if drafting:
        print("batch sizes from, k: decode-only steps with drafting rows, the drafting rows, "
              "output tokens per drafting row")
        for (lo, k), (n, rows, tokens) in drafting.items():
            print(f"  {lo}-{2 * lo - 1}, {k}: {n} steps, {rows:.0f} rows, {tokens:.2f} tokens")
    for k, a in acceptance_at_one(lines).items():
        print(f"batch 1, k = {k}, whole decode-only steps emitting 1..{k + 1} tokens: "
              f"{a['emitted']}; acceptance per draft position they imply "
              f"{[None if x is None else round(x, 2) for x in a['alpha']]}")
        if a["along"]:
            print(f"  by the request's output so far: " + "; ".join(
                f"from {lo}: {n} steps, {mean:.2f} tokens" for lo, n, mean in a["along"]))


if __name__ == "__main__":
    main()
