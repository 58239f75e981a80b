"""One serving mode against another over the rounds of ``lvspec-bench serve`` sweeps, with the
noise stated: the ratio of output tokens/s per level, as a geometric mean over rounds with a
95 % confidence interval.

    python -m lvspec_vllm.bench.paired SERVE_JSON [SERVE_JSON ...] --mode lvspec-auto-cold
        [--against none]

A sweep run with ``--repeat N --interleave`` measures each level N times per mode, the modes
seconds apart; the ratio of two modes in one round pairs them in time, which removes the
machine's slow drift but not its noise from one level's seconds to the next (on a 2-core CPU
a single ratio moves by 20 %). So the log of each round's ratio is one sample: per level the
mean over rounds (and over every sweep given, as long as they ran the same levels), its 95 %
interval from Student's t, and the same over every level and round together ("all"), which is
the reading that can resolve a few per cent. The pooled interval treats the rounds of different
levels as independent samples: they ran on servers that kept their state from level to level,
so it is the interval of this sweep's conditions, not of every machine's.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

# Student's t, two-sided 95 %, by degrees of freedom (1-30; above, the normal's)
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
        2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
        2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t95(df: int) -> float:
    return _T95[df - 1] if df <= len(_T95) else 1.960


def ratio_interval(ratios: list[float]) -> tuple[float, float, float]:
    """(geometric mean, low, high) of the ratios, the bounds at 95 % (NaN for one ratio)."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return math.exp(mean), math.nan, math.nan
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = t95(n - 1) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def paired_ratios(sweeps: list[dict], mode: str, against: str
                  ) -> tuple[list[int], list[list[float]]]:
    """The levels' concurrencies, and per level every round's tokens/s of ``mode`` over
    ``against``'s, over the sweeps."""
    per_level: list[list[float]] | None = None
    first: list[int] = []
    for sweep in sweeps:
        runs = {r["mode"]: r for r in sweep["runs"]}
        for m in (mode, against):
            if m not in runs:
                raise SystemExit(f"mode {m!r} is not in a sweep; it has {sorted(runs)}")
        ours, theirs = runs[mode]["levels"], runs[against]["levels"]
        levels = [lv["concurrency"] for lv in ours]
        if per_level is None:
            per_level, first = [[] for _ in ours], levels
        elif levels != first:
            raise SystemExit(f"the sweeps ran different levels: {first} and {levels}")
        for i, (a, b) in enumerate(zip(ours, theirs)):
            a_runs = a.get("tokens_per_s_runs") or [a["tokens_per_s"]]
            b_runs = b.get("tokens_per_s_runs") or [b["tokens_per_s"]]
            per_level[i] += [x / y for x, y in zip(a_runs, b_runs)]
    return first, per_level or []


def _fmt(interval: tuple[float, float, float]) -> str:
    mean, lo, hi = interval
    return f"{mean:.2f}x" if math.isnan(lo) else f"{mean:.2f}x [{lo:.2f}-{hi:.2f}]"


def report(sweeps: list[dict], mode: str, against: str) -> str:
    levels, ratios = paired_ratios(sweeps, mode, against)
    head = "| | " + " | ".join(f"c={c}" for c in levels) + " | all |"
    cells = [_fmt(ratio_interval(r)) for r in ratios]
    pooled = [x for r in ratios for x in r]
    rows = [head, "|---" * (len(levels) + 2) + "|",
            f"| {mode} / {against} | " + " | ".join(cells) + f" | {_fmt(ratio_interval(pooled))} |",
            "| rounds | " + " | ".join(str(len(r)) for r in ratios) + f" | {len(pooled)} |"]
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweeps", nargs="+", help="serve.json files of lvspec-bench serve")
    ap.add_argument("--mode", required=True)
    ap.add_argument("--against", default="none")
    args = ap.parse_args(argv)
    sweeps = [json.loads(Path(p).read_text()) for p in args.sweeps]
    print(f"output tokens/s of {args.mode} over {args.against}: geometric mean of the rounds' "
          "ratios [95 % interval]")
    print(report(sweeps, args.mode, args.against))


if __name__ == "__main__":
    main()
