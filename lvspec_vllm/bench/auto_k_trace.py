"""What auto_k saw, per step: ``python -m lvspec_vllm.bench.auto_k_trace TRACE``.

TRACE is the file a run wrote with ``LVSPEC_AUTO_K_TRACE`` set (``patches/scheduler.py``): one
JSON line per engine step, ``[batch, k, prefill tokens, seconds, previous step's k, share of
decode rows that drafted]``. Printed: the share of wall time in steps that computed prefill chunks, and per batch size and k the
median time of the steps auto_k fits (decode only, k kept from the step before), beside the
steps it leaves out.
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
    for batch, k, p, seconds, previous, *share in steps:
        # the medians are of whole steps at k: a partly cold one is not (older traces: 5)
        if p == 0 and k == previous and (share or [1.0])[0] == 1.0:
            decode[(batch, k)].append(seconds)
    return {
        "steps": len(steps), "seconds": total,
        "prefill_steps": len(prefill),
        "prefill_share": sum(row[3] for row in prefill) / total if total else 0.0,
        "decode_ms": {f"{b},{k}": (len(v), 1e3 * statistics.median(v))
                      for (b, k), v in sorted(decode.items())},
    }


def main(argv=None) -> None:
    path = (argv or sys.argv[1:])[0]
    with open(path) as f:
        s = summarise([json.loads(line) for line in f if line.strip()])
    print(f"{s['steps']} steps, {s['seconds']:.3f} s; {s['prefill_steps']} with prefill chunks: "
          f"{100 * s['prefill_share']:.0f} % of the time")
    print("batch, k: decode-only steps that kept the previous k, median ms")
    for key, (n, ms) in s["decode_ms"].items():
        print(f"  {key}: {n} steps, {ms:.2f} ms")


if __name__ == "__main__":
    main()
