"""What auto_k saw, per step: ``python -m lvspec_vllm.bench.auto_k_trace TRACE``.

TRACE is the file a run wrote with ``LVSPEC_AUTO_K_TRACE`` set (``patches/scheduler.py``): one
JSON line per engine step, ``[batch, k, prefill tokens, seconds, previous step's k, share of
decode rows that drafted]``. Printed: the share of wall time in steps that computed prefill
chunks, and per batch size and k the median time of the whole decode-only steps auto_k fits
(k kept from the step before, every decode row drafting), beside the steps it leaves out.
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict


def summarise(lines: list[list]) -> dict:
    steps = [row for row in lines if row[3] is not None]
    total = sum(row[3] for row in steps)
    prefill = [row for row in steps if row[2] > 0]
    decode = defaultdict(list)
    # samples at k > 0 by the share of decode rows that drafted (cold requests)
    shares = {"whole": 0, "partly cold": 0, "all cold": 0}
    for batch, k, p, seconds, previous, *share in steps:
        # older traces have 5 fields: a sample kept the previous k
        s = share[0] if share else (1.0 if k == previous else None)
        if k and s is not None:
            shares["whole" if s == 1.0 else "partly cold" if s > 0 else "all cold"] += 1
        # the medians are of whole steps at k: a partly cold one is not
        if p == 0 and k == previous and s == 1.0:
            decode[(batch, k)].append(seconds)
    return {
        "steps": len(steps), "seconds": total,
        "prefill_steps": len(prefill),
        "prefill_share": sum(row[3] for row in prefill) / total if total else 0.0,
        "k_above_0_samples": shares,
        "decode_ms": {f"{b},{k}": (len(v), 1e3 * statistics.median(v))
                      for (b, k), v in sorted(decode.items())},
    }


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    with open(path) as f:
        s = summarise([json.loads(line) for line in f if line.strip()])
    print(f"{s['steps']} steps, {s['seconds']:.3f} s; {s['prefill_steps']} with prefill chunks: "
          f"{100 * s['prefill_share']:.0f} % of the time")
    print("samples at k > 0 by the share of decode rows that drafted: "
          + ", ".join(f"{n} {kind}" for kind, n in s["k_above_0_samples"].items()))
    print("batch, k: decode-only steps that kept the previous k, median ms")
    for key, (n, ms) in s["decode_ms"].items():
        print(f"  {key}: {n} steps, {ms:.2f} ms")


if __name__ == "__main__":
    main()
